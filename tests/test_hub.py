"""Hub ids fetched online: against a local hub-shaped HTTP server (tests/hub_server.py) that
huggingface_hub talks to through HF_ENDPOINT, as it would to the hub. Nothing in the client is mocked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hub_server import Hub, Server

from memplan import hub as hub_mod
from memplan.build import model_config_dict
from memplan.errors import MemplanError
from memplan.spec import SUPPORTED_TYPES, resolve

TINY_LLAMA = {"model_type": "llama", "vocab_size": 97, "hidden_size": 16, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 40,
              "max_position_embeddings": 32}
# layer = q 16*16 + k,v 2*8*16 + o 16*16 + mlp 3*16*40 + 2 norms 2*16 = 2,720; x2 = 5,440
# + embed 97*16 1,552 + head 1,552 + final norm 16 = 8,560
TINY_LLAMA_PARAMS = 8_560
# vocab 200: embed and head 200*16 = 3,200 each: 5,440 + 6,400 + 16 = 11,856
WIDE_VOCAB = {**TINY_LLAMA, "vocab_size": 200}
WIDE_VOCAB_PARAMS = 11_856
TOKEN = "hf_test_token_with_access"


@pytest.fixture
def served(tmp_path, monkeypatch):
    """(Hub, Server, cache folder): a hub served at HF_ENDPOINT (tests/conftest.py points it at a local
    port before huggingface_hub is imported), an empty HF_HOME in tmp_path, no token, online."""
    hub = Hub()
    server = Server(hub)
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    yield hub, server, home / "hub"
    server.stop()


def resolves_to(hub: Hub) -> list[str]:
    return [path for method, path, _ in hub.requests if "/resolve/" in path]


# ---- a public repo ------------------------------------------------------------------------------

def test_public_repo_is_fetched_into_the_cache_and_read_offline_next_time(served, monkeypatch):
    hub, server, cache = served
    commit = hub.add("acme/tiny-llama", TINY_LLAMA)
    spec = resolve("acme/tiny-llama")
    assert spec.param_count == TINY_LLAMA_PARAMS
    assert spec.name == f"acme/tiny-llama@{commit[:7]}"
    stored = cache / "models--acme--tiny-llama" / "snapshots" / commit / "config.json"
    assert json.loads(stored.read_text()) == TINY_LLAMA
    assert (cache / "models--acme--tiny-llama" / "refs" / "main").read_text() == commit
    assert str(stored) in spec.source and server.url in spec.source
    fetched = len(hub.requests)
    assert resolves_to(hub) and all(p == "/acme/tiny-llama/resolve/main/config.json" for p in resolves_to(hub))

    server.stop()  # the next call reads the cache: no request, no network
    again = resolve("acme/tiny-llama")
    assert (again.name, again.param_count) == (spec.name, TINY_LLAMA_PARAMS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve("acme/tiny-llama").name == spec.name
    assert len(hub.requests) == fetched


def test_a_revision_is_fetched_and_then_found_by_its_name_offline(served):
    hub, server, cache = served
    main = hub.add("acme/tiny-llama", TINY_LLAMA)
    v2 = hub.add("acme/tiny-llama", WIDE_VOCAB, revision="v2")
    spec = resolve("acme/tiny-llama@v2")
    assert (spec.name, spec.param_count) == (f"acme/tiny-llama@{v2[:7]}", WIDE_VOCAB_PARAMS)
    assert resolve(f"acme/tiny-llama@{main}").param_count == TINY_LLAMA_PARAMS  # a commit, fetched too
    server.stop()
    assert resolve("acme/tiny-llama@v2").param_count == WIDE_VOCAB_PARAMS  # refs/v2 in the cache
    assert resolve(f"acme/tiny-llama@{main}").param_count == TINY_LLAMA_PARAMS  # snapshots/<commit>
    assert resolve(spec.name).param_count == WIDE_VOCAB_PARAMS  # the short commit an estimate is named by
    with pytest.raises(MemplanError, match="could not reach the hub"):
        resolve("acme/tiny-llama@v3")  # a revision never fetched is not guessed from another


def test_unknown_revision_says_so(served):
    hub, _, _ = served
    hub.add("acme/tiny-llama", TINY_LLAMA)
    with pytest.raises(hub_mod.HubError, match=r"acme/tiny-llama has no revision 'v9' on the hub"):
        resolve("acme/tiny-llama@v9")


def test_revision_that_walks_out_of_the_cache_is_refused(served):
    with pytest.raises(MemplanError, match=r"'\.\./\.\./x' is not a revision"):
        resolve("acme/tiny-llama@../../x")
    assert served[0].requests == []


# ---- gated, missing, offline --------------------------------------------------------------------

def test_gated_repo_says_accept_the_license_and_log_in(served, monkeypatch):
    hub, _, _ = served
    hub.add("acme/gated-llama", TINY_LLAMA, gated_token=TOKEN)
    with pytest.raises(hub_mod.HubError, match=r"acme/gated-llama is a gated model: accept its license on "
                       r"http://127\.0\.0\.1:\d+/acme/gated-llama, then log in with `hf auth login` or set HF_TOKEN"):
        resolve("acme/gated-llama")
    assert hub.requests[-1][2] is None  # anonymous: 401
    monkeypatch.setenv("HF_TOKEN", "hf_someone_without_access")
    with pytest.raises(hub_mod.HubError, match="is a gated model"):
        resolve("acme/gated-llama")  # a token without access: 403
    assert hub.requests[-1][2] == "Bearer hf_someone_without_access"
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # HF_TOKEN with access: the config comes
    assert resolve("acme/gated-llama").param_count == TINY_LLAMA_PARAMS


def test_missing_repo_says_it_does_not_exist_and_names_close_catalog_models(served):
    with pytest.raises(hub_mod.HubError, match=r"facebook/opt-13 does not exist on the hub \(http://127\.0\.0\.1:\d+\) "
                       r"\(did you mean facebook/opt-13b.*\); if it is private, log in with `hf auth login`"):
        resolve("facebook/opt-13")
    with pytest.raises(hub_mod.HubError, match=r"acme/nothing does not exist on the hub \(http[^)]*\); if it is private"):
        resolve("acme/nothing")


def test_repo_without_config_json_says_so(served):
    served[0].add("acme/dataset-like", None)
    with pytest.raises(hub_mod.HubError, match=r"acme/dataset-like@main holds no config.json"):
        resolve("acme/dataset-like")


def test_stopped_server_says_offline_at_once_with_how_to_point_at_a_local_config(served):
    _, server, _ = served
    server.stop()
    start = time.perf_counter()
    with pytest.raises(hub_mod.HubError) as err:
        resolve("meta-llama/Llama-2-7b")
    # huggingface_hub alone retries a refused connection with backoff for ~25 s; memplan asks once.
    assert time.perf_counter() - start < 5
    message = str(err.value)
    assert "\n" not in message
    assert "did you mean meta-llama/Llama-2-7b-hf" in message
    assert f"could not reach the hub at {server.url} (ConnectError" in message
    assert "`memplan fit path/to/config.json`" in message and "`hf download meta-llama/Llama-2-7b config.json`" in message


def test_hf_hub_offline_says_offline_without_a_request(served, monkeypatch):
    hub, _, _ = served
    hub.add("acme/tiny-llama", TINY_LLAMA)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hub_mod.HubError, match=r"could not reach the hub at .* \(HF_HUB_OFFLINE is set\); "
                       r"give a local config"):
        resolve("acme/tiny-llama")
    assert hub.requests == []


def test_endpoint_that_is_no_hub_says_check_hf_endpoint(served, monkeypatch):
    hub, _, _ = served
    hub.add("acme/tiny-llama", TINY_LLAMA)
    original = hub.answer

    def no_commit_header(method, path, auth):
        status, headers, body = original(method, path, auth)
        headers.pop("X-Repo-Commit", None)  # a plain web server, not a hub
        return status, headers, body

    monkeypatch.setattr(hub, "answer", no_commit_header)
    with pytest.raises(hub_mod.HubError, match=r"does not answer as a Hugging Face hub .*check HF_ENDPOINT"):
        resolve("acme/tiny-llama")


# ---- precedence and what is read ----------------------------------------------------------------

def test_catalog_then_local_path_then_cache_then_hub(served, tmp_path, monkeypatch):
    hub, server, cache = served
    hub.add("facebook/opt-125m", WIDE_VOCAB)  # the catalog wins: the hub is never asked
    assert resolve("facebook/opt-125m").name == "facebook/opt-125m"
    folder = tmp_path / "acme" / "tiny-llama"  # a local folder spelled like a hub id wins over the hub
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(TINY_LLAMA))
    monkeypatch.chdir(tmp_path)
    hub.add("acme/tiny-llama", WIDE_VOCAB)
    assert resolve("acme/tiny-llama").param_count == TINY_LLAMA_PARAMS
    assert hub.requests == []
    monkeypatch.chdir(tmp_path / "acme")  # no such folder here: the hub, then the cache
    assert resolve("acme/tiny-llama").param_count == WIDE_VOCAB_PARAMS
    hub.add("acme/tiny-llama", TINY_LLAMA)  # main moves on the hub; the cached copy is what is read
    assert resolve("acme/tiny-llama").param_count == WIDE_VOCAB_PARAMS


def test_bare_names_are_not_sent_to_the_hub(served):
    with pytest.raises(MemplanError, match=r"unknown model 'opt-13' \(did you mean .*opt-13b"):
        resolve("opt-13")
    assert served[0].requests == []


def test_multimodal_config_plans_its_text_model(served):
    hub, _, _ = served
    hub.add("acme/tiny-llava", {"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"},
                                "text_config": TINY_LLAMA, "image_token_index": 96})
    spec = resolve("acme/tiny-llava")
    assert spec.param_count == TINY_LLAMA_PARAMS and spec.model_type == "llama"
    assert spec.name.endswith("(text model, llama; the llava vision tower is not counted)")


def test_gemma3_plans_its_text_model_and_an_unsupported_one_keeps_its_message(served):
    hub, _, _ = served
    text = {"model_type": "gemma3_text", "vocab_size": 97, "hidden_size": 16, "intermediate_size": 40,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 4,
            "max_position_embeddings": 32, "sliding_window": 8}
    hub.add("acme/tiny-gemma3", {"model_type": "gemma3", "text_config": text, "vision_config": {}})
    if "gemma3_text" in SUPPORTED_TYPES:
        assert resolve("acme/tiny-gemma3").name.endswith("(text model, gemma3_text; the gemma3 vision tower is not "
                                                         "counted)")
    else:
        with pytest.raises(MemplanError, match=r"acme/tiny-gemma3 \(hub\) text_config: model_type 'gemma3_text' "
                           r"is not supported"):
            resolve("acme/tiny-gemma3")
    name, fields = model_config_dict("acme/tiny-gemma3")  # the trace builds the text model from the cache
    assert fields == text and name.endswith("the gemma3 vision tower is not counted)")


def test_text_config_without_model_type_says_what_is_wrong(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "llava", "text_config": {"hidden_size": 16}}))
    with pytest.raises(MemplanError, match=r"a 'llava' config whose text_config has no model_type"):
        resolve(str(path))


def test_unsupported_model_type_keeps_its_message_and_still_traces_from_the_cache(served):
    hub, server, _ = served
    mamba = {"model_type": "mamba", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
             "state_size": 4, "expand": 2, "conv_kernel": 4}
    commit = hub.add("acme/tiny-mamba", mamba)
    with pytest.raises(MemplanError, match=r"model_type 'mamba' is not supported"):
        resolve("acme/tiny-mamba")
    server.stop()
    name, fields = model_config_dict("acme/tiny-mamba")  # the trace's config: the fetched one, from the cache
    assert name == f"acme/tiny-mamba@{commit[:7]}" and fields == mamba


def test_trace_config_of_a_hub_id_is_the_fetched_one(served):
    hub, _, _ = served
    commit = hub.add("acme/tiny-llama", TINY_LLAMA)
    assert model_config_dict("acme/tiny-llama") == (f"acme/tiny-llama@{commit[:7]}", TINY_LLAMA)


def test_causal_lm_text_models_match_transformers():
    """The types whose causal LM transformers builds from text_config alone, checked against transformers."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as causal_lm

    def builds_text_model(model_type: str) -> bool:
        text_class = CONFIG_MAPPING[model_type].sub_configs.get("text_config")
        return getattr(getattr(transformers, causal_lm[model_type]), "config_class", None) is text_class

    known = [t for t in sorted(hub_mod.CAUSAL_LM_IS_TEXT_MODEL) if t in causal_lm]  # older transformers lack some
    assert "mllama" in known
    for model_type in known:
        assert builds_text_model(model_type), model_type
    assert not builds_text_model("gemma3")  # Gemma3ForConditionalGeneration: vision tower included


# ---- the command line ---------------------------------------------------------------------------

def test_fit_on_a_hub_id_names_it_with_its_commit(served, fit_json):
    commit = served[0].add("acme/tiny-llama", TINY_LLAMA)
    code, ests = fit_json("acme/tiny-llama", "--method", "zo-sgd", "--gpu", "h100")
    assert code == 0 and ests[0]["model"] == f"acme/tiny-llama@{commit[:7]}"


def test_fit_failures_are_one_line_exit_2(served, run_cli):
    served[0].add("acme/gated-llama", TINY_LLAMA, gated_token=TOKEN)
    for model, text in (("acme/gated-llama", "is a gated model"), ("acme/missing", "does not exist on the hub")):
        code, out, err = run_cli("fit", model, "--gpu", "h100")
        assert code == 2 and out == ""
        assert err.startswith("memplan: error: ") and err.count("\n") == 1 and text in err, err


def test_a_fresh_process_fetches_and_then_runs_offline(served, tmp_path):
    """As a user runs it: HF_ENDPOINT and HF_HUB_OFFLINE read by a new process at start."""
    hub, server, _ = served
    commit = hub.add("acme/tiny-llama", TINY_LLAMA)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    cmd = [sys.executable, "-m", "memplan", "fit", "acme/tiny-llama", "--method", "zo-sgd", "--gpu", "h100", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["estimates"][0]["model"] == f"acme/tiny-llama@{commit[:7]}"
    assert done.stderr == ""  # no progress bar, no warning
    server.stop()
    offline = subprocess.run([*cmd[:4], "acme/other-llama", *cmd[5:]], capture_output=True, text=True,
                             env={**env, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert offline.returncode == 2 and offline.stdout == ""
    assert offline.stderr.count("\n") == 1 and "HF_HUB_OFFLINE is set" in offline.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"}, timeout=120)
    assert again.returncode == 0 and json.loads(again.stdout)["estimates"][0]["model"].startswith("acme/tiny-llama@")


def test_trace_and_check_plans_resolve_a_hub_id_as_fit_does(served, run_cli, tmp_path):
    hub, server, _ = served
    commit = hub.add("acme/tiny-llama", TINY_LLAMA)
    neox = {"model_type": "gpt_neox", "vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 32, "max_position_embeddings": 32}
    hub.add("acme/tiny-neox", neox)  # no analytic family: the trace alone plans it
    plan = tmp_path / "plan.yaml"
    plan.write_text("gpus: [h100]\nruns:\n  - name: hub\n    model: acme/tiny-llama\n    method: zo-sgd\n")
    code, out, err = run_cli("check", str(plan), "--json")  # fetches
    assert code == 0, err
    assert json.loads(out)["results"][0]["estimate"]["model"] == f"acme/tiny-llama@{commit[:7]}"
    code, out, err = run_cli("trace", "acme/tiny-neox", "-m", "zo-sgd", "--dtype", "fp32", "--batch", "1",
                             "--seq", "8", "--json")  # fetches
    assert code == 0, err
    server.stop()  # both run from the cache now
    code, out, err = run_cli("trace", "acme/tiny-llama", "-m", "zo-sgd", "--dtype", "fp32", "--batch", "1",
                             "--seq", "8", "--json")
    assert code == 0, err
    traced = json.loads(out)["estimates"][0]
    assert traced["model"] == f"acme/tiny-llama@{commit[:7]}"
    assert traced["trainable_params"] == TINY_LLAMA_PARAMS
    code, out, err = run_cli("trace", "acme/tiny-neox", "-m", "zo-sgd", "--dtype", "fp32", "--batch", "1",
                             "--seq", "8", "--json")
    assert code == 0, err
    assert json.loads(out)["estimates"][0]["model"].startswith("acme/tiny-neox@")
    assert run_cli("check", str(plan), "--json")[0] == 0


def test_a_cache_that_cannot_be_written_says_so(served, tmp_path, monkeypatch):
    served[0].add("acme/tiny-llama", TINY_LLAMA)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "a-file" / "hub"))  # under a regular file: no folder there
    with pytest.raises(hub_mod.HubError, match=r"cannot write the Hugging Face cache \(.*a-file.*\); set HF_HUB_CACHE"):
        resolve("acme/tiny-llama")


def test_a_fresh_process_uses_the_saved_login_for_a_gated_model(served, tmp_path):
    """`hf auth login` saves the token in HF_HOME/token; huggingface_hub sends it, and the gated config comes."""
    hub, _, _ = served
    commit = hub.add("acme/gated-llama", TINY_LLAMA, gated_token=TOKEN)
    home = Path(os.environ["HF_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    cmd = [sys.executable, "-m", "memplan", "fit", "acme/gated-llama", "--method", "zo-sgd", "--gpu", "h100", "--json"]
    refused = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 2 and "is a gated model" in refused.stderr
    (home / "token").write_text(TOKEN)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["estimates"][0]["model"] == f"acme/gated-llama@{commit[:7]}"
    assert hub.requests[-1][2] == f"Bearer {TOKEN}"
