"""The frame network (modules/frame_net.py): it learns a moving pulse from every frame where a
run-level POD + GP cannot, its blend weight is the validation runs' best, and it is
deterministic and stored whole."""
import numpy as np
import pytest
import torch

from modules.baseline import POD, relative_l2
from modules.checkpoint import load_model_state
from modules.frame_net import WEIGHTS, FrameNet, choose_weight, train_frame_net
from modules.gp import fit_predict

CPU = torch.device("cpu")


def moving_pulses(params: np.ndarray, steps: int = 16, nodes: int = 96) -> np.ndarray:
    """A pulse released at p0 and carried at speed p1, its height p2: (n, T, N)."""
    x = np.linspace(0.0, 1.0, nodes)
    t = np.linspace(0.0, 1.0, steps)[None, :, None]
    centre = 0.15 + 0.2 * params[:, 0, None, None] + 0.5 * params[:, 1, None, None] * t
    return (1.0 + params[:, 2, None, None]) * np.exp(-((x - centre) / 0.04) ** 2)


def test_the_network_learns_a_moving_pulse_that_pod_and_a_gp_of_its_coefficients_cannot():
    rng = np.random.default_rng(0)
    train, test = rng.random((48, 3)), rng.random((12, 3))
    fields, truth = moving_pulses(train), moving_pulses(test)
    net = train_frame_net(train, fields, epochs=120, seed=0, device=CPU)
    with torch.inference_mode():
        own = net(torch.as_tensor(test)).numpy()
    pod = POD.fit(fields)
    classical = pod.reconstruct(fit_predict(train, pod.coefficients(fields), test, 0), truth.shape[1:])
    mean_error = relative_l2(np.broadcast_to(fields.mean(axis=0), truth.shape), truth).mean()
    net_error, pod_error = relative_l2(own, truth).mean(), relative_l2(classical, truth).mean()
    assert net_error < 0.5 * pod_error < 0.5 * mean_error          # measured: 0.15, 0.42 and 0.91


def test_the_blend_weight_is_the_one_that_made_the_truth_and_ties_go_to_the_gp():
    rng = np.random.default_rng(1)
    gp, net = rng.normal(size=(2, 5, 4, 7)), rng.normal(size=(2, 5, 4, 7))
    weight, errors = choose_weight(gp, net, gp + 0.35 * (net - gp))
    assert weight == WEIGHTS[7] == 0.35 and errors[7] < 1e-12 < errors.min(initial=1.0, where=WEIGHTS != 0.35)
    assert errors[0] == relative_l2(gp, gp + 0.35 * (net - gp)).mean()
    assert choose_weight(gp, gp.copy(), net)[0] == 0.0            # the network adds nothing: the GP alone


def test_training_is_seeded_and_the_stored_network_predicts_the_same():
    rng = np.random.default_rng(2)
    params = rng.random((10, 3))
    fields = moving_pulses(params, steps=5, nodes=24)
    first, again = (train_frame_net(params, fields, epochs=3, seed=4, device=CPU) for _ in range(2))
    other = train_frame_net(params, fields, epochs=3, seed=5, device=CPU)
    x = torch.as_tensor(params[:3])
    with torch.inference_mode():
        torch.testing.assert_close(first(x), again(x), rtol=0, atol=0)
        assert not torch.allclose(first(x), other(x))
        first.weight.fill_(0.4)
        stored = first.stored()
        loaded = FrameNet(**stored["shape"])
        load_model_state(loaded, stored["state"], "conditioner.pt", "conditioner checkpoint", "retrain")
        torch.testing.assert_close(loaded.eval()(x), first(x), rtol=0, atol=0)
        assert float(loaded.weight) == pytest.approx(0.4) and stored["shape"] == {"inputs": 3, "steps": 5, "nodes": 24, "width": 256}
        point = torch.zeros(3, 5, 24)
        torch.testing.assert_close(loaded.disagreement(point, x), first(x))
    # the mean frame and the unit make the targets centred: the untrained network predicts the mean frame
    untrained = train_frame_net(params, fields, epochs=1, seed=4, device=CPU)
    np.testing.assert_allclose(untrained.mean.numpy(), fields.mean(axis=0), rtol=1e-6, atol=1e-30)
    assert float(untrained.unit) == np.abs(fields - fields.mean(axis=0)).max().astype(np.float32)


def test_the_optimiser_steps_are_capped_whatever_the_epochs(monkeypatch):
    """MAX_STEPS bounds the training of large studies: with the cap at 3 steps of 2 batches per
    epoch, 50 epochs train exactly as 1 epoch does, and 1 epoch is not cut."""
    import modules.frame_net as frame_net
    rng = np.random.default_rng(3)
    params = rng.random((16, 3))
    fields = moving_pulses(params, steps=16, nodes=24)              # 256 frames: 2 batches of 128
    monkeypatch.setattr(frame_net, "MAX_STEPS", 3)
    capped, one = (train_frame_net(params, fields, epochs=e, seed=0, device=CPU) for e in (50, 1))
    x = torch.as_tensor(params[:2])
    monkeypatch.setattr(frame_net, "MAX_STEPS", 10_000)
    two = train_frame_net(params, fields, epochs=2, seed=0, device=CPU)
    with torch.inference_mode():
        torch.testing.assert_close(capped(x), one(x), rtol=0, atol=0)
        assert not torch.allclose(two(x), one(x))
