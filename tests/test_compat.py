"""The private torch / transformers APIs memplan reaches into still behave as `memplan._compat` assumes."""

import pytest

torch = pytest.importorskip("torch")

from memplan import _compat  # noqa: E402


def test_torch_private_apis():
    with _compat.fake_tensor_mode()():
        fake = torch.empty(4)
    assert _compat.is_fake(fake) and not _compat.is_fake(torch.empty(4))
    t = torch.zeros(8)
    assert _compat.storage_key(t[2:].untyped_storage()) == _compat.storage_key(t.untyped_storage())
    assert issubclass(_compat.dispatch_mode_base(), object)
    assert _compat.tree_leaves(((t,), {"a": [t]})) == [t, t]
    assert _compat.cuda_in_bad_fork() is False


def test_transformers_mask_patch_is_undone():
    masking_utils = pytest.importorskip("transformers.masking_utils")
    before = masking_utils._ignore_causal_mask_sdpa, masking_utils.find_packed_sequence_indices
    with _compat.sdpa_masks_as_for_real_tensors():
        assert masking_utils._ignore_causal_mask_sdpa(None, 8, 8, 0, 0) is True
        assert masking_utils.find_packed_sequence_indices(None) is None
    assert (masking_utils._ignore_causal_mask_sdpa, masking_utils.find_packed_sequence_indices) == before


def test_distributed_apis_and_their_patches_are_undone():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch without distributed")
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
    import torch.nn.parallel.distributed as ddp

    resize = torch.UntypedStorage.resize_
    seen = []
    with _compat.storage_resizes(seen.append):
        t = torch.zeros(4)
        t.untyped_storage().resize_(0)
    assert torch.UntypedStorage.resize_ is resize and len(seen) == 1 and seen[0].nbytes() == 0
    methods = [getattr(FSDPParamGroup, n) for n in ("unshard", "wait_for_unshard", "post_backward")]
    with _compat.fsdp_collectives(lambda: None, lambda grads: None):
        assert getattr(FSDPParamGroup, "unshard") is not methods[0]
    assert [getattr(FSDPParamGroup, n) for n in ("unshard", "wait_for_unshard", "post_backward")] == methods
    checks = ddp._verify_param_shape_across_processes, ddp._sync_module_states
    with _compat.ddp_without_data_checks():
        assert ddp._sync_module_states is not checks[1]
    assert (ddp._verify_param_shape_across_processes, ddp._sync_module_states) == checks
    assert _compat.is_wait_tensor(torch.ops._c10d_functional.wait_tensor.default)

    with _compat.fake_process_group(4):
        assert dist.get_world_size() == 4 and dist.get_rank() == 0
        mesh = _compat.device_mesh("cpu", 4)
        from torch.distributed.tensor import DTensor, Shard

        whole = torch.arange(8.0)
        d = DTensor.from_local(whole[:2], mesh, [Shard(0)], run_check=False, shape=(8,), stride=(1,))
        assert _compat.is_dtensor(d) and not _compat.is_dtensor(whole)
        assert _compat.is_dtensor_type((DTensor,)) and not _compat.is_dtensor_type((torch.Tensor,))
        assert _compat.local_tensor(d).shape == (2,) and _compat.local_tensor(whole) is whole
        z = _compat.shaped_as(torch.ones(2), d)
        assert _compat.is_dtensor(z) and z.shape == (8,) and z.placements == d.placements
    assert not dist.is_initialized()
