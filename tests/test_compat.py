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
