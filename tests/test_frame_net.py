"""The frame and point networks (modules/frame_net.py, modules/point_net.py): they learn a moving
pulse from every frame where a run-level POD + GP cannot, their blend weights are the validation
runs' best, and they are deterministic and stored whole."""
import numpy as np
import pytest
import torch

from modules.baseline import POD, relative_l2
from modules.frame_net import (WEIGHTS, NetBlend, blend_errors, choose_weights, load_blend,
                               train_frame_net, training_epochs)
from modules.point_net import PointNet, embed_nodes, mesh_positions, read_positions, train_point_net
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
    net = train_frame_net(train, fields, epochs=120, seed=0, device=CPU)[0]
    with torch.inference_mode():
        own = net(torch.as_tensor(test)).numpy()
    pod = POD.fit(fields)
    classical = pod.reconstruct(fit_predict(train, pod.coefficients(fields), test, 0), truth.shape[1:])
    mean_error = relative_l2(np.broadcast_to(fields.mean(axis=0), truth.shape), truth).mean()
    net_error, pod_error = relative_l2(own, truth).mean(), relative_l2(classical, truth).mean()
    assert net_error < 0.5 * pod_error < 0.5 * mean_error          # measured: 0.15, 0.42 and 0.91


def test_the_blend_weights_are_the_ones_that_made_the_truth_and_ties_go_to_the_gp():
    rng = np.random.default_rng(1)
    gp, net, other = rng.normal(size=(3, 5, 4, 7))
    weights, combos, errors = choose_weights(gp, [net], gp + 0.35 * (net - gp))
    assert weights.tolist() == [0.35] and np.allclose(combos[:, 0], WEIGHTS) and errors[7] < 1e-6 < 1e-2 < np.delete(errors, 7).min()
    assert errors[0] == pytest.approx(relative_l2(gp, gp + 0.35 * (net - gp)).mean(), rel=1e-12)
    assert choose_weights(gp, [gp.copy()], net)[0].tolist() == [0.0]      # the network adds nothing: the GP alone
    truth = gp + 0.2 * (net - gp) + 0.45 * (other - gp)
    weights, combos, errors = choose_weights(gp, [net, other], truth)
    assert weights.tolist() == [0.2, 0.45] and len(combos) == 231 and combos.sum(axis=1).max() == 1.0
    # the quadratic forms give what the blended fields give
    direct = [relative_l2(gp + w1 * (net - gp) + w2 * (other - gp), truth).mean() for w1, w2 in combos[::17]]
    np.testing.assert_allclose(blend_errors(gp, [net, other], truth, combos[::17]), direct, rtol=1e-10)
    # two stacked fields (4 nodes each): each field's relative L2, averaged
    gp, net, other, truth = rng.normal(size=(4, 5, 4, 8)) * np.array([1.0] * 4 + [1e-5] * 4)
    direct = [relative_l2(gp + w1 * (net - gp) + w2 * (other - gp), truth, 2).mean() for w1, w2 in combos[::17]]
    np.testing.assert_allclose(blend_errors(gp, [net, other], truth, combos[::17], 2), direct, rtol=1e-10)


def test_training_is_seeded_and_the_stored_network_predicts_the_same():
    rng = np.random.default_rng(2)
    params = rng.random((10, 3))
    fields = moving_pulses(params, steps=5, nodes=24)
    first, again = (train_frame_net(params, fields, epochs=3, seed=4, device=CPU)[0] for _ in range(2))
    other = train_frame_net(params, fields, epochs=3, seed=5, device=CPU)[0]
    x = torch.as_tensor(params[:3])
    with torch.inference_mode():
        torch.testing.assert_close(first(x), again(x), rtol=0, atol=0)
        assert not torch.allclose(first(x), other(x))
        assert first.stored()["shape"] == {"inputs": 3, "steps": 5, "nodes": 24, "width": 256}
        # a blend of two networks is stored whole: the loaded one predicts the same weighted mean
        blend = NetBlend([first, other], [0.3, 0.1])
        loaded = load_blend(blend.stored(), "conditioner.pt", "retrain").eval()
        torch.testing.assert_close(loaded(x), 0.75 * first(x) + 0.25 * other(x), rtol=1e-6, atol=1e-6)
        assert float(loaded.weight) == pytest.approx(0.4)
        point = torch.zeros(3, 5, 24, dtype=torch.float64)
        torch.testing.assert_close(loaded.disagreement(point, x), loaded(x).double())
        # the earlier layout, one frame network holding its weight, loads as a blend of one
        earlier = {"shape": first.stored()["shape"], "state": {**first.stored()["state"], "weight": torch.tensor(0.4)}}
        from modules.errors import UserError
        with pytest.raises(UserError, match="members and weights do not match"):
            load_blend({"members": blend.stored()["members"], "weights": [0.3]}, "conditioner.pt", "retrain")
        alone = load_blend(earlier, "conditioner.pt", "retrain").eval()
        torch.testing.assert_close(alone(x), first(x), rtol=0, atol=0)
        assert float(alone.weight) == pytest.approx(0.4)
    # the mean frame and the unit make the targets centred: the untrained network predicts the mean frame
    untrained = train_frame_net(params, fields, epochs=1, seed=4, device=CPU)[0]
    np.testing.assert_allclose(untrained.mean.numpy(), fields.mean(axis=0), rtol=1e-6, atol=1e-30)
    np.testing.assert_allclose(untrained.unit.numpy(), np.abs(fields - fields.mean(axis=0)).max(), rtol=1e-6)
    # float32 frames (the pipeline's, to halve the memory) train the same network and are left as they were
    single = fields.astype(np.float32)
    kept = single.copy()
    from_single = train_frame_net(params, single, epochs=3, seed=4, device=CPU)[0]
    np.testing.assert_array_equal(single, kept)
    with torch.inference_mode():
        torch.testing.assert_close(from_single(x), first(x), rtol=1e-5, atol=1e-6)


def test_the_optimiser_steps_are_capped_whatever_the_epochs(monkeypatch):
    """MAX_STEPS bounds the training of large studies: with the cap at 3 steps of 2 batches per
    epoch, 50 epochs train exactly as 1 epoch does, and 1 epoch is not cut."""
    import modules.frame_net as frame_net
    rng = np.random.default_rng(3)
    params = rng.random((16, 3))
    fields = moving_pulses(params, steps=16, nodes=24)              # 256 frames: 2 batches of 128
    monkeypatch.setattr(frame_net, "MAX_STEPS", 3)
    capped, one = (train_frame_net(params, fields, epochs=e, seed=0, device=CPU)[0] for e in (50, 1))
    x = torch.as_tensor(params[:2])
    monkeypatch.setattr(frame_net, "MAX_STEPS", 10_000)
    two = train_frame_net(params, fields, epochs=2, seed=0, device=CPU)[0]
    monkeypatch.setattr(frame_net, "CPU_NODE_STEPS", 3 * 24)        # on CPU the mesh's size caps them too
    by_nodes = train_frame_net(params, fields, epochs=50, seed=0, device=CPU)[0]
    with torch.inference_mode():
        torch.testing.assert_close(capped(x), one(x), rtol=0, atol=0)
        torch.testing.assert_close(by_nodes(x), one(x), rtol=0, atol=0)
        assert not torch.allclose(two(x), one(x))


def test_large_meshes_train_fewer_steps_on_cpu_only():
    """heat_inclusion's 60 batches of 1,681 nodes keep their 150 epochs; 50,000 nodes get what 2e7
    steps × nodes allow on CPU (400 steps: 6 epochs), the whole 10,000 steps on a GPU."""
    cuda = torch.device("cuda")                 # a device object only: nothing runs on it
    assert training_epochs(150, 60, 1681, CPU) == 150
    assert training_epochs(150, 60, 50_000, CPU) == 6 and training_epochs(150, 60, 50_000, cuda) == 150
    assert training_epochs(150, 500, 50_000, cuda) == 20 and training_epochs(150, 5_000, 50_000, CPU) == 1


def test_the_point_network_learns_a_pulse_that_moves_across_the_mesh_from_the_nodes_positions():
    """Given where each node is, the pulse is one shape that moves with the parameters: the point
    network learns it from a few runs better than POD + GP, and is seeded and stored whole."""
    rng = np.random.default_rng(5)
    train, test = rng.random((32, 3)), rng.random((8, 3))          # 32,768 points: 1,500 steps are 188 passes
    fields, truth = moving_pulses(train, nodes=64), moving_pulses(test, nodes=64)
    order = rng.permutation(64)                                 # the nodes in no spatial order: positions say where
    fields, truth = fields[..., order], truth[..., order]
    positions = np.linspace(0.0, 1.0, 64)[order, None]
    net = train_point_net(train, fields, positions, steps=1500, seed=0, device=CPU)[0]
    with torch.inference_mode():
        own = net(torch.as_tensor(test)).numpy()
    pod = POD.fit(fields)
    classical = pod.reconstruct(fit_predict(train, pod.coefficients(fields), test, 0), truth.shape[1:])
    net_error, pod_error = relative_l2(own, truth).mean(), relative_l2(classical, truth).mean()
    assert net_error < 0.5 * pod_error                     # measured: 0.145 against 0.458
    first, again, other = (train_point_net(train, fields, positions, steps=20, seed=s, device=CPU)[0] for s in (1, 1, 2))
    stored = net.stored()
    loaded = PointNet(**stored["shape"])
    loaded.load_state_dict(stored["state"])
    with torch.inference_mode():
        x = torch.as_tensor(test[:2])
        torch.testing.assert_close(again(x), first(x), rtol=0, atol=0)
        assert not torch.allclose(other(x), first(x))
        torch.testing.assert_close(loaded.eval()(x), net(x), rtol=0, atol=0)


def test_the_point_networks_budget_follows_the_runs_and_exact_steps_are_exact(monkeypatch):
    """At most STEPS_PER_RUN steps per training run (4 runs, 1 each: 100 steps train as 4 do), whatever
    point_net_steps says; a refit's `exact` steps are not cut."""
    import modules.point_net as point_net
    rng = np.random.default_rng(7)
    params = rng.random((4, 3))
    fields, positions = moving_pulses(params, steps=8, nodes=64), np.linspace(0.0, 1.0, 64)[:, None]
    monkeypatch.setattr(point_net, "STEPS_PER_RUN", 1)
    (capped, fit), (four, _), (two, _), (exact, fit_exact) = (
        train_point_net(params, fields, positions, steps=s, seed=0, device=CPU, exact=e)
        for s, e in ((100, False), (4, False), (2, False), (100, True)))
    assert fit.budget == fit.steps == 4 and fit_exact.budget == 100
    x = torch.as_tensor(params[:2])
    with torch.inference_mode():
        torch.testing.assert_close(capped(x), four(x), rtol=0, atol=0)
        assert not torch.allclose(two(x), four(x)) and not torch.allclose(exact(x), four(x))


def _held(params, fields, gp):
    from modules.net_training import HeldRuns
    return HeldRuns(params, fields, gp, np.arange(fields.shape[1] * fields.shape[2]))


def test_a_network_that_adds_nothing_to_the_gp_stops_after_patience_checks():
    """Held-out runs that the GP predicts exactly: no blend can gain, so the network stops after its first
    check and PATIENCE more, a 20th of its budget each, and keeps the first check's weights."""
    from modules.net_training import CHECKS, PATIENCE
    rng = np.random.default_rng(3)
    params = rng.random((24, 3))
    fields = moving_pulses(params, steps=6, nodes=32)
    net, fit = train_frame_net(params[:18], fields[:18], epochs=400, seed=0, device=CPU,
                               held=_held(params[18:], fields[18:], fields[18:]))
    every = fit.budget // CHECKS
    assert fit.budget == 400 and fit.steps == every and fit.stopped == (PATIENCE + 1) * every
    assert fit.judged == [0.0] * (PATIENCE + 1) and fit.gp_error == 0.0


def test_a_network_keeps_the_weights_of_its_best_check_on_the_held_out_runs():
    """Against a GP that predicts the mean frame, the network's blend gains as it learns: the kept weights are
    the best check's, and they predict the held-out runs as well as that check said."""
    from modules.net_training import CHECKS
    rng = np.random.default_rng(4)
    params = rng.random((30, 3))
    fields = moving_pulses(params, steps=6, nodes=32)
    mean = np.broadcast_to(fields[:24].mean(axis=0), fields[24:].shape)
    held = _held(params[24:], fields[24:], mean)
    net, fit = train_point_net(params[:24], fields[:24], np.linspace(0, 1, 32)[:, None], steps=800, seed=0,
                               device=CPU, held=held)
    assert fit.gp_error > 2 * min(fit.judged) and fit.steps == (int(np.argmin(fit.judged)) + 1) * (fit.budget // CHECKS)
    judge = held.judge(net.mean, net.unit)
    with torch.inference_mode():
        own = ((net(torch.as_tensor(params[24:])).numpy() - net.mean.numpy()) / net.unit.numpy()).reshape(6, -1)
    assert judge.error(own) == pytest.approx(min(fit.judged), rel=1e-4)


def test_node_positions_come_from_the_mesh_a_file_or_the_fields(tmp_path):
    """mesh.vtu points (stacked fields: once per field, the field's number one more column), a file
    of one row per node, or an embedding that keeps nodes whose values move together close."""
    import meshio
    from modules.errors import UserError
    grid = np.stack(np.meshgrid(np.arange(5.0), np.arange(4.0), indexing="xy"), -1).reshape(-1, 2)
    points = np.concatenate([grid * 0.5, np.zeros((20, 1))], 1)            # a flat mesh: z does not vary
    meshio.write(tmp_path / "mesh.vtu", meshio.Mesh(points, [("vertex", np.arange(20)[:, None])]))
    one = mesh_positions(tmp_path / "mesh.vtu", 20, 20)
    np.testing.assert_allclose(one, grid / 4.0)                           # one scale for both axes: the aspect kept
    two = mesh_positions(tmp_path / "mesh.vtu", 40, 30)                   # two stacked fields, Dim3_red 30
    assert two.shape == (30, 3) and two[20:, 2].min() > two[:20, 2].max() and mesh_positions(tmp_path / "mesh.vtu", 30, 30) is None
    np.savetxt(tmp_path / "nodes.csv", grid, delimiter=",")
    np.testing.assert_allclose(read_positions(tmp_path / "nodes.csv", 20, 12), (grid / 4.0)[:12])
    with pytest.raises(UserError, match="needs 21 rows"):
        read_positions(tmp_path / "nodes.csv", 21, 21)
    # a line of nodes whose values are pulses moving along it: the embedding's first value orders them
    rng = np.random.default_rng(6)
    fields = moving_pulses(rng.random((30, 3)), steps=10, nodes=80)
    embedded = embed_nodes(fields, seed=0)
    assert embedded.shape == (80, 3) and embedded.min() == 0.0 and embedded.max() == 1.0
    rank = abs(np.corrcoef(np.argsort(np.argsort(embedded[:, 0])), np.arange(80))[0, 1])
    assert rank > 0.9


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nodes_held_fixed_are_embedded_and_predicted_as_their_value(dtype):
    """Dirichlet nodes (one value in every run and step) have no signal to embed: before, their zero norm gave
    NaN positions and scikit-learn's error ended the training. They sit at the origin, the other nodes keep
    their order, and the point network predicts them as their value exactly."""
    rng = np.random.default_rng(6)
    fields = moving_pulses(rng.random((30, 3)), steps=10, nodes=80).astype(dtype) + dtype(300.0)
    fields[:, :, [0, 1, 78, 79]] = dtype(300.0)
    embedded = embed_nodes(fields, seed=0)
    assert np.isfinite(embedded).all() and (embedded[[0, 1, 78, 79]] == 0).all()
    moving = np.setdiff1d(np.arange(80), [0, 1, 78, 79])
    assert abs(np.corrcoef(np.argsort(np.argsort(embedded[moving, 0])), np.arange(76))[0, 1]) > 0.9
    net = train_point_net(rng.random((30, 3)), fields, embedded, steps=20, seed=0, device=CPU)[0]
    assert net.varies[[0, 1, 78, 79]].eq(0).all()
    np.testing.assert_array_equal(net.varies.numpy(), np.ptp(fields, axis=(0, 1)) > 0)     # float32 rounds tails away
    with torch.no_grad():
        out = net(torch.rand(2, 3))
    assert (out[:, :, [0, 1, 78, 79]] == 300.0).all() and not (out[:, :, moving] == 300.0).all()
