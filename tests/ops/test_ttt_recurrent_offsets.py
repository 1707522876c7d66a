"""The primal TTT op with the offset as a device tensor (the decode step's form): the same results as host offsets
and as the naive reference, no host read, and a tensor of the wrong shape or dtype refused."""

import pytest
import torch
from host_sync import forbid_host_reads
from test_ttt_ops import KINDS, make_inputs, op


@pytest.mark.parametrize("online", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_tensor_offsets_equal_host_offsets_and_the_reference_without_host_reads(kind, online):
    args = make_inputs(kind, T=1)
    host = op("recurrent", kind)(**args, online=online)
    ref = op("naive_recurrent", kind)(**args, online=online)
    offset = torch.tensor(args["offset"])
    with forbid_host_reads():
        dev = op("recurrent", kind)(**{**args, "offset": offset}, online=online)
    for a, b, r in zip([dev[0], *dev[1], *dev[2]], [host[0], *host[1], *host[2]], [ref[0], *ref[1], *ref[2]],
                       strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad", [torch.zeros(2, dtype=torch.int64), torch.zeros(3), torch.zeros(3, dtype=torch.bool)])
def test_a_tensor_offset_of_the_wrong_shape_or_dtype_is_refused(bad):
    with pytest.raises(ValueError, match=r"offset must be an integer tensor \[3\]"):
        op("recurrent", "linear")(**{**make_inputs("linear", T=1), "offset": bad})


@pytest.mark.parametrize("values", [[9, 0, 0], [0, -1, 0]])
def test_a_tensor_offset_out_of_range_is_refused(values):
    """Checked on the device (no host read in the op; on the CPU the check raises at once)."""
    args = make_inputs("linear", T=1)
    b = args["token_idx"].numel()
    bad = torch.tensor(values)  # b = 8
    with pytest.raises(RuntimeError, match=rf"offset must hold values in \[0, {b}\)"):
        op("recurrent", "linear")(**{**args, "offset": bad})
