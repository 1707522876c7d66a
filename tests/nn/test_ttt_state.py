"""TTTState's row operations: select, where, put rows, cat, in-place copy, bytes; every tensor on one device."""

import pytest
import torch

from ttt_speech.nn import TTTConfig, TTTState, build_ttt_layer

C, H, B_SZ = 16, 2, 4
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


def layer_and_state(device="cpu", B=3, T=6, layer_type="mlp"):
    """A layer with every input transform (so the state has conv tails and input state) and a state mid
    mini-batch whose rows differ."""
    torch.manual_seed(0)
    cfg = TTTConfig(hidden_size=C, num_heads=H, layer_type=layer_type, mini_batch_size=B_SZ, share_qk=True,
                    pre_conv=True, centre=True)
    layer = build_ttt_layer(cfg).to(device)
    with torch.no_grad():
        layer.learnable_ttt_lr_bias.fill_(1.0)
        _, state = layer(torch.randn(B, T, C, device=device))
        # rows at positions 2, 0, 2: row 1 reset then fed one mini-batch
        state = layer.reset_state(state, torch.tensor([False, True, False], device=device))
        _, one = layer(torch.randn(1, B_SZ, C, device=device), state.select_rows(torch.tensor([1])))
        state = state.put_rows(torch.tensor([1]), one)
    return layer, state


def rows_of(state: TTTState, r: int) -> list[torch.Tensor]:
    return [t[r] for t in state.tensors()]


def assert_rows_equal(a: TTTState, ra: int, b: TTTState, rb: int) -> None:
    for x, y in zip(rows_of(a, ra), rows_of(b, rb), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("device", DEVICES)
def test_every_tensor_lives_on_the_state_device(device):
    _, state = layer_and_state(device)
    assert state.device.type == device
    assert all(t.device.type == device for t in state.tensors())
    assert state.position.dtype == torch.int64 and state.position.tolist() == [6 % B_SZ, 0, 6 % B_SZ]
    meta = build_ttt_layer(TTTConfig(C, H)).init_state(2, "meta")
    assert all(t.is_meta for t in meta.tensors())


@pytest.mark.parametrize("device", DEVICES)
def test_select_rows_reorders_and_owns_its_memory(device):
    _, state = layer_and_state(device)
    for idx in (torch.tensor([2, 0, 2]), torch.tensor([2, 0, 2], device=device)):
        sel = state.select_rows(idx)
        assert sel.batch_size == 3
        for i, r in enumerate([2, 0, 2]):
            assert_rows_equal(sel, i, state, r)
    sel.params["W2"][0].zero_()
    assert state.params["W2"][2].abs().max() > 0
    assert state.index_select is not None and state.reorder(idx).batch_size == 3  # the old names


@pytest.mark.parametrize("device", DEVICES)
def test_where_takes_rows_from_either_state(device):
    layer, state = layer_and_state(device)
    fresh = layer.init_state(3, device)
    mixed = fresh.where(torch.tensor([True, False, True]), state)
    assert_rows_equal(mixed, 0, fresh, 0)
    assert_rows_equal(mixed, 1, state, 1)
    assert_rows_equal(mixed, 2, fresh, 2)
    assert mixed.position.tolist() == [0, 0, 0] and state.position.tolist() == [2, 0, 2]


@pytest.mark.parametrize("device", DEVICES)
def test_put_rows_and_cat(device):
    layer, state = layer_and_state(device)
    fresh = layer.init_state(3, device)
    put = fresh.put_rows(torch.tensor([2, 0]), state.select_rows(torch.tensor([0, 1])))
    assert_rows_equal(put, 2, state, 0)
    assert_rows_equal(put, 0, state, 1)
    assert_rows_equal(put, 1, fresh, 1)
    assert all(t.abs().max() == 0 for t in fresh.grads.values())  # put_rows returns a new state
    # a row read back from the host (e.g. a saved conversation) goes to the state's device
    host_row = state.select_rows(torch.tensor([0]))._map(lambda t: t.cpu())
    assert_rows_equal(fresh.index_copy(torch.tensor([1]), host_row), 1, state, 0)
    both = TTTState.cat([state.select_rows(torch.tensor([2])), fresh, state.select_rows(torch.tensor([1]))])
    assert both.batch_size == 5
    assert_rows_equal(both, 0, state, 2)
    assert_rows_equal(both, 2, fresh, 1)
    assert_rows_equal(both, 4, state, 1)
    with pytest.raises(ValueError, match="at least one state"):
        TTTState.cat([])


@pytest.mark.parametrize("device", DEVICES)
def test_copy_writes_in_place_only_the_masked_rows(device):
    layer, state = layer_and_state(device)
    before = state.select_rows(torch.arange(3))
    storage = [t.data_ptr() for t in state.tensors()]
    fresh = layer.init_state(3, device)
    assert state.copy_(fresh, torch.tensor([False, True, False], device=device)) is state
    assert [t.data_ptr() for t in state.tensors()] == storage
    assert_rows_equal(state, 0, before, 0)
    assert_rows_equal(state, 1, fresh, 1)
    assert_rows_equal(state, 2, before, 2)
    state.copy_(before)
    assert [t.data_ptr() for t in state.tensors()] == storage
    for r in range(3):
        assert_rows_equal(state, r, before, r)


def test_where_and_copy_refuse_to_broadcast_rows():
    layer, state = layer_and_state()  # batch 3
    one = layer.init_state(1, "cpu")
    with pytest.raises(ValueError, match=r"TTTState.copy_: the other state has batch size 1, this one 3"):
        state.copy_(one)
    with pytest.raises(ValueError, match=r"TTTState.where: the other state has batch size 1, this one 3"):
        state.where(torch.ones(3, dtype=torch.bool), one)
    for mask in (torch.ones(1, dtype=torch.bool), torch.ones(3)):
        with pytest.raises(ValueError, match=r"TTTState.copy_: mask must be bool of shape \[3\]"):
            state.copy_(layer.init_state(3, "cpu"), mask)


def test_nbytes_counts_every_tensor():
    layer, state = layer_and_state()
    F = 4 * (C // H)
    weights = 2 * 3 * H * ((C // H) * F + F + F * (C // H) + C // H)  # params and grads, B = 3
    tails = 3 * C * 3 * 2  # conv_tail and pre_conv tail, kernel 4
    centre = 3 * 3 * C + 3
    assert state.nbytes == 4 * (weights + tails + centre) + 8 * 3
    assert state.nbytes == sum(t.numel() * t.element_size() for t in state.tensors())
    assert state.select_rows(torch.tensor([0])).nbytes * 3 == state.nbytes


def test_detach_cuts_the_graph():
    layer = build_ttt_layer(TTTConfig(C, H))
    _, state = layer(torch.randn(1, 3, C))
    assert state.params["W1"].requires_grad and not state.detach().params["W1"].requires_grad
