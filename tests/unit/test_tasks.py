"""The paper tasks on the real files in ORDERLAB_DATA: loaders, layouts, models, metrics, configs.

Big datasets are loaded once per module (fixtures); every training check is a few SGD steps on a
small subset.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from orderlab.config import load_config, validate_grid
from orderlab.data import check_files
from orderlab.errors import OrderlabError
from orderlab.grads import microbatch_gradient, num_parameters, per_example_gradients
from orderlab.tasks import (
    TASKS,
    TaskData,
    TaskDefaults,
    load_task_data,
    make_task,
    reset_model_state,
    wikitext2,
)
from orderlab.tasks.files import FILES, files_of
from orderlab.tasks.m4 import load_series, make_windows
from orderlab.tasks.wikitext2 import TRAIN_TOKENS, load_corpus, streams_from_chunks

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def mnist(data_dir):
    return make_task("mnist-logreg").load(data_dir)


@pytest.fixture(scope="module")
def fashion(data_dir):
    return make_task("fashion-mnist-cnn").load(data_dir)


@pytest.fixture(scope="module")
def m4(data_dir):
    return make_task("m4-mlp").load(data_dir)


@pytest.fixture(scope="module")
def wikitext(data_dir):
    return make_task("wikitext2-lstm").load(data_dir)


def counts(labels: torch.Tensor) -> list[int]:
    return torch.bincount(labels, minlength=10).tolist()


def sgd_losses(task, model, inputs, targets, steps: int = 8, lr: float = 0.1) -> list[float]:
    """Full-batch SGD on a small subset; the loss before each step."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        reset_model_state(model)  # the LSTM: the same zero start every step
        optimizer.zero_grad()
        loss = task.loss(model(inputs), targets)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def assert_per_example_gradients_match(task, model, inputs, targets) -> None:
    """orderlab.grads' per-example gradients equal a backward on each example alone (unit: example)."""
    grads, mean_loss = per_example_gradients(model, task.loss, inputs, targets)
    assert grads.shape == (len(inputs), num_parameters(model))
    for k in range(len(inputs)):
        single, _ = microbatch_gradient(model, task.loss, inputs[k : k + 1], targets[k : k + 1])
        torch.testing.assert_close(grads[k], single, rtol=1e-4, atol=1e-6)
    _, loss = microbatch_gradient(model, task.loss, inputs, targets)
    assert float(mean_loss) == pytest.approx(float(loss), rel=1e-5)


# ---------------------------------------------------------------- files and registry


def test_shared_files_match_the_table(data_dir):
    statuses = {file.relative: status for file, status in check_files(FILES.values(), data_dir)}
    missing = {"hmda/features-processed-NY-2017.npz", "hmda/features-processed-NY-2017.pt"}
    assert {path for path, status in statuses.items() if status != "ok"} == missing
    assert all(statuses[path] == "missing" for path in missing)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_has_the_shared_hooks(name):
    task = make_task(name)
    assert isinstance(task, TaskDefaults)
    assert set(task.data_files) <= set(FILES) and files_of(name) == [FILES[p] for p in task.data_files]
    assert set(task.supported_units) <= {"example", "microbatch"} and task.supported_units
    assert task.metric_name in ("accuracy", "perplexity", "rmse")


def test_only_tasks_with_a_test_protocol_report_test_metrics(data_dir):
    task = make_task("digits-logreg")
    assert task.test_metrics(task.make_model(), data_dir) == {}  # validation is its only held-out set
    assert type(make_task("m4-mlp")).test_metrics is not TaskDefaults.test_metrics
    assert type(make_task("wikitext2-lstm")).test_metrics is not TaskDefaults.test_metrics


def test_finalize_metric_per_metric():
    assert make_task("mnist-logreg").finalize_metric(0.5, 0.91) == 0.91
    assert make_task("digits-logreg").finalize_metric(0.5, 0.91) == 0.91
    assert make_task("m4-mlp").finalize_metric(0.25, 0.25) == pytest.approx(0.5)
    assert make_task("wikitext2-lstm").finalize_metric(5.0, 5.0) == pytest.approx(math.exp(5.0))


def test_arrange_is_the_identity_for_example_tasks(m4):
    assert make_task("m4-mlp").arrange(m4, num_workers=4, microbatch_size=4) is m4


def test_missing_file_names_file_checksum_and_source(tmp_path):
    with pytest.raises(OrderlabError) as mnist_missing:
        make_task("mnist-logreg").load(tmp_path)
    message = str(mnist_missing.value)
    assert "mnist/train-images-idx3-ubyte.gz" in message and "440fcabf73cc546f" in message
    assert "yann.lecun.com" in message and "orderlab data fetch" in message
    with pytest.raises(OrderlabError, match="apt-get install dataset-fashion-mnist"):
        make_task("fashion-mnist-cnn").load(tmp_path)
    with pytest.raises(OrderlabError, match=r"(?s)wikitext-2/train.txt.*pytorch/examples.*9e9fa1ad"):
        make_task("wikitext2-lstm").load(tmp_path)
    with pytest.raises(OrderlabError, match=r"(?s)m4/Weekly-train.csv.*M4-methods.*d478d3f6"):
        make_task("m4-mlp").load(tmp_path / "m4-elsewhere")


def test_a_corrupt_file_is_named_with_both_checksums(tmp_path):
    (tmp_path / "mnist").mkdir()
    (tmp_path / "mnist/train-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(
        OrderlabError, match=r"corrupt: sha256 [0-9a-f]{64} != expected sha256 440fcabf.* or 0b367032"
    ):
        make_task("mnist-logreg").load(tmp_path)


# ---------------------------------------------------------------- MNIST and Fashion-MNIST


def test_mnist_loader(mnist):
    assert mnist.train_inputs.shape == (60000, 784) and mnist.val_inputs.shape == (10000, 784)
    assert mnist.train_inputs.dtype == torch.float32 and mnist.train_targets.dtype == torch.int64
    assert (
        counts(mnist.train_targets) == MNIST_TRAIN_COUNTS and counts(mnist.val_targets) == MNIST_TEST_COUNTS
    )
    assert float(mnist.train_inputs.mean()) == pytest.approx(
        0.0, abs=1e-3
    )  # mean pixel 0.1307 normalized away


def test_fashion_mnist_loader(fashion):
    assert fashion.train_inputs.shape == (60000, 1, 28, 28) and fashion.val_inputs.shape == (10000, 1, 28, 28)
    assert counts(fashion.train_targets) == [6000] * 10 and counts(fashion.val_targets) == [1000] * 10
    assert float(fashion.train_inputs.mean()) == pytest.approx(0.0, abs=1e-3)
    assert float(fashion.train_inputs.std()) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.datasets  # the fixtures come through request.getfixturevalue
@pytest.mark.parametrize(("name", "dim"), [("mnist-logreg", 7850), ("fashion-mnist-cnn", 61706)])
def test_image_tasks_train_and_split_per_example(name, dim, request):
    data = request.getfixturevalue("mnist" if name == "mnist-logreg" else "fashion")
    task = make_task(name)
    torch.manual_seed(0)
    model = task.make_model()
    assert num_parameters(model) == dim
    inputs, targets = data.train_inputs[:64], data.train_targets[:64]
    assert_per_example_gradients_match(task, model, inputs[:4], targets[:4])
    before = task.evaluate_sums(model, data.val_inputs[:512], data.val_targets[:512])
    losses = sgd_losses(task, model, inputs, targets, lr=0.05)
    assert losses[-1] < losses[0]
    after = task.evaluate_sums(model, data.val_inputs[:512], data.val_targets[:512])
    assert before.count == after.count == 512 and 0 <= after.metric_sum <= 512


# ---------------------------------------------------------------- M4


def test_m4_windows_follow_cd_grab(m4, data_dir):
    assert m4.train_inputs.shape == (107384, 20) and m4.train_targets.shape == (107384, 6)
    assert m4.val_inputs.shape == (11932, 20) and m4.val_targets.shape == (11932, 6)
    series = load_series(data_dir)[0]
    assert len(series) == 359 and min(map(len, series)) == 80 and max(map(len, series)) == 2597
    assert all(abs(s.mean()) < 1e-9 and abs(s.std() - 1) < 1e-9 for s in series)
    # CD-GraB's construction, literally: the (series, start) list shuffled in place with RandomState(0)
    windows = [(i, j) for i in range(len(series)) for j in range(0, len(series[i]) - 20 - 6, 3)]
    assert len(windows) == 119316
    np.random.RandomState(0).shuffle(windows)
    for k in (0, 1, 5000, 107383):
        i, j = windows[k]
        np.testing.assert_allclose(m4.train_inputs[k].numpy(), series[i][j : j + 20], rtol=1e-6)
        np.testing.assert_allclose(m4.train_targets[k].numpy(), series[i][j + 20 : j + 26], rtol=1e-6)
    i, j = windows[107384]
    np.testing.assert_allclose(m4.val_inputs[0].numpy(), series[i][j : j + 20], rtol=1e-6)
    inputs, _ = make_windows(series, 20, 6, 3)
    assert len(inputs) == 119316


def test_m4_model_trains_and_evaluates_on_the_test_horizon(m4, data_dir):
    task = make_task("m4-mlp")
    torch.manual_seed(0)
    model = task.make_model()
    assert num_parameters(model) == 5569 and model(m4.train_inputs[:3]).shape == (3, 6)
    assert model.forecast(m4.train_inputs[:3], 13).shape == (3, 13)
    losses = sgd_losses(task, model, m4.train_inputs[:256], m4.train_targets[:256], lr=0.1)
    assert losses[-1] < losses[0]
    sums = task.evaluate_sums(model, m4.val_inputs, m4.val_targets)
    assert sums.loss_sum == pytest.approx(sums.metric_sum, rel=1e-4)  # MSE: metric mean = loss mean
    assert task.finalize_metric(sums.loss_sum / sums.count, sums.metric_sum / sums.count) > 0
    test = task.test_metrics(model, data_dir)
    assert test["num_series"] == 359 and 0 < test["smape"] < 200 and test["rmse"] > 0


def test_m4_per_example_gradients(m4):
    task = make_task("m4-mlp")
    torch.manual_seed(0)
    assert_per_example_gradients_match(task, task.make_model(), m4.train_inputs[:4], m4.train_targets[:4])


def test_m4_smape_of_a_perfect_forecast_is_zero(data_dir):
    series, actual, means, stds = load_series(data_dir)

    class Oracle(torch.nn.Module):  # looks the answer up by the window's last value
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))
            self.answers = {
                float(np.float32(s[-1])): (a - m) / sd
                for s, a, m, sd in zip(series, actual, means, stds, strict=True)
            }

        def forecast(self, window: torch.Tensor, horizon: int) -> torch.Tensor:
            return torch.tensor(np.stack([self.answers[float(v)] for v in window[:, -1]]))[:, :horizon]

    assert make_task("m4-mlp").test_metrics(Oracle(), data_dir)["smape"] == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------- WikiText-2 and the LSTM


def test_wikitext_vocabulary_and_default_layout(wikitext, data_dir):
    corpus = load_corpus(data_dir)
    assert corpus.vocab_size == 33278
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (2088628, 217646, 245569)
    assert wikitext.train_inputs.shape == (59675, 35) and wikitext.train_inputs.dtype == torch.int64
    assert wikitext.val_inputs.shape == (10, 21763)  # valid.txt as 10 streams, 21,764 tokens each
    assert torch.equal(wikitext.train_inputs[1], corpus.train[35:70])
    assert torch.equal(wikitext.train_targets[1], corpus.train[36:71])
    assert torch.equal(wikitext.val_targets[3, :-1], wikitext.val_inputs[3, 1:])


def test_arrange_lays_chunks_out_by_worker_column_and_chunk_by_hand():
    task = make_task("wikitext2-lstm", {"bptt": 3})
    data = TaskData(
        torch.empty(0), torch.empty(0), torch.empty(0), torch.empty(0), {TRAIN_TOKENS: torch.arange(102)}
    )
    # 2 workers x 2 columns: B = 4 columns of T = 25 tokens (2 dropped); C = (25 - 1) // 3 = 8 chunks each
    arranged = task.arrange(data, num_workers=2, microbatch_size=2)
    assert arranged.train_inputs.shape == (2 * 8 * 2, 3)
    # example w*C*mb + c*mb + j = chunk c of column w*mb + j; column b starts at token 25*b
    for w, c, j in [(0, 0, 0), (0, 0, 1), (0, 7, 1), (1, 0, 0), (1, 2, 1), (1, 7, 1)]:
        first = 25 * (w * 2 + j) + 3 * c
        index = w * 8 * 2 + c * 2 + j
        assert arranged.train_inputs[index].tolist() == [first, first + 1, first + 2], (w, c, j)
        assert arranged.train_targets[index].tolist() == [first + 1, first + 2, first + 3], (w, c, j)
    assert arranged.train_inputs[21].tolist() == [81, 82, 83]  # w=1, c=2, j=1: column 3 = tokens 75..99
    assert arranged.train_targets[31].tolist() == [97, 98, 99]  # the last target of column 3
    # worker 1's shard (examples 16..31) read back chunk-major gives its 2 columns in text order
    streams = streams_from_chunks(arranged.train_inputs[16:], num_streams=2)
    assert streams.tolist() == [list(range(50, 74)), list(range(75, 99))]
    with pytest.raises(OrderlabError, match="train.batch_size"):
        task.arrange(data, num_workers=8, microbatch_size=8)


def test_the_worker_shard_sees_chunk_u_of_its_columns_as_unit_u():
    from orderlab.config import TrainConfig
    from orderlab.loop import Shard, plan_trial

    task = make_task("wikitext2-lstm", {"bptt": 3})
    data = TaskData(
        torch.empty(0),
        torch.empty(0),
        torch.zeros(4, 9),
        torch.zeros(4, 9),
        {TRAIN_TOKENS: torch.arange(102)},
    )
    train = TrainConfig(batch_size=4, num_workers=2, unit="microbatch", epochs=1)
    arranged = task.arrange(data, train.num_workers, train.microbatch_size)
    plan = plan_trial(train, len(arranged.train_targets), dim=1, needs_gradients=False, message_kind="none")
    assert (plan.shard_size, plan.unit_size, plan.num_dropped) == (8, 2, 0)
    shard = Shard(arranged, plan, range(1, 2), device=torch.device("cpu"))
    inputs, _ = shard.batch(np.array([[2]]))  # unit 2 of worker 1: chunk 2 of columns 2 and 3
    assert inputs.tolist() == [[56, 57, 58], [81, 82, 83]]


def test_arrange_on_the_real_corpus_keeps_columns_contiguous(wikitext):
    task = make_task("wikitext2-lstm")
    arranged = task.arrange(wikitext, num_workers=4, microbatch_size=4)  # the paper's B = 16, W = 4
    num_chunks = (2088628 // 16 - 1) // 35
    assert num_chunks == 3729 and arranged.train_inputs.shape == (4 * num_chunks * 4, 35)
    shard = slice(2 * num_chunks * 4, 3 * num_chunks * 4)  # worker 2
    inputs, targets = arranged.train_inputs[shard], arranged.train_targets[shard]
    for c, j in [(0, 0), (10, 3), (3727, 2)]:  # chunk c + 1 of a column continues chunk c
        assert inputs[(c + 1) * 4 + j, 0] == targets[c * 4 + j, -1]
    column = 2 * 4 + 1  # worker 2, j = 1
    assert torch.equal(inputs[1], wikitext.extras[TRAIN_TOKENS][column * 130539 : column * 130539 + 35])


def test_lstm_carries_its_state_across_chunks_and_resets(wikitext):
    torch.manual_seed(0)
    task = make_task("wikitext2-lstm")
    model = task.make_model()
    assert num_parameters(model) == 2179966 and task.supported_units == ("microbatch",)
    chunk = wikitext.train_inputs[:4]
    fresh = model(chunk)
    assert fresh.shape == (4, 35, 33278)
    carried = model(chunk)  # starts from the state the first call left
    assert not torch.allclose(carried, fresh)
    assert all(not t.requires_grad for t in model.state)  # detached between chunks
    model.reset_state()
    torch.testing.assert_close(model(chunk), fresh)
    torch.testing.assert_close(model(chunk[:2]), fresh[:2])  # another batch size starts from zeros
    # carrying the state over two windows equals reading both windows at once
    reset_model_state(model)
    stream = wikitext.extras[TRAIN_TOKENS][:70].view(1, 70)
    whole = model(stream)
    reset_model_state(model)
    torch.testing.assert_close(torch.cat([model(stream[:, :35]), model(stream[:, 35:])], dim=1), whole)
    strict = make_task("wikitext2-lstm", {"reset_hidden_each_chunk": True}).make_model()
    strict.load_state_dict(model.state_dict())
    torch.testing.assert_close(strict(chunk), fresh)
    torch.testing.assert_close(strict(chunk), fresh)


def test_lstm_evaluation_reads_streams_in_order(wikitext):
    torch.manual_seed(0)
    task = make_task("wikitext2-lstm")
    model = task.make_model().eval()
    arranged = task.arrange(wikitext, num_workers=1, microbatch_size=2)
    rows = arranged.train_inputs[: 6 * 2], arranged.train_targets[: 6 * 2]  # 6 chunks of 2 columns
    by_chunks = task.evaluate_sums(model, *rows, num_streams=2)
    streams = streams_from_chunks(rows[0], 2), streams_from_chunks(rows[1], 2)
    assert streams[0].shape == (2, 6 * 35)
    by_streams = task.evaluate_sums(model, *streams)
    assert model.state is None  # evaluation leaves no state behind
    assert by_chunks.count == by_streams.count == 2 * 6 * 35
    assert by_chunks.loss_sum == pytest.approx(by_streams.loss_sum, rel=1e-6)
    reset_model_state(model)  # by hand: window after window with the state carried
    with torch.no_grad():
        manual = sum(
            float(task.loss(model(streams[0][:, t : t + 35]), streams[1][:, t : t + 35])) * 2 * 35
            for t in range(0, 6 * 35, 35)
        )
    assert by_streams.loss_sum == pytest.approx(manual, rel=1e-5)
    mean = by_streams.loss_sum / by_streams.count
    assert mean == pytest.approx(math.log(33278), rel=0.02)  # an untrained model is near uniform
    assert task.finalize_metric(mean, by_streams.metric_sum / by_streams.count) == pytest.approx(
        math.exp(mean)
    )


def test_lstm_trains_with_microbatch_gradients(wikitext, data_dir, monkeypatch):
    torch.manual_seed(0)
    task = make_task("wikitext2-lstm")
    model = task.make_model()
    inputs, targets = wikitext.train_inputs[:4], wikitext.train_targets[:4]
    grad, loss = microbatch_gradient(model, task.loss, inputs, targets)
    assert grad.shape == (2179966,) and math.isfinite(float(loss))
    losses = sgd_losses(task, model, inputs, targets, steps=5, lr=5.0)
    assert losses[-1] < losses[0]
    # the test set read as 10 streams; a 1,000-token prefix of it keeps this fast (the whole is ~20 s on CPU)
    corpus = load_corpus(data_dir)
    short = replace(corpus, test=corpus.test[:1000])
    monkeypatch.setattr(wikitext2, "load_corpus", lambda _: short)
    test = task.test_metrics(model, data_dir)
    assert test["num_tokens"] == 99 * 10 and test["perplexity"] == pytest.approx(math.exp(test["loss"]))


# ---------------------------------------------------------------- HMDA


def test_hmda_labels_and_the_missing_features_message(data_dir):
    from orderlab.tasks.hmda import load_labels

    y_train, y_test = load_labels(data_dir)
    assert y_train.shape == (195285,) and y_test.shape == (48822,)
    assert int(y_train.sum()) == 150484 and int(y_test.sum()) == 37445
    with pytest.raises(OrderlabError) as missing:
        make_task("hmda-logreg").load(data_dir)
    message = str(missing.value)
    assert "features-processed-NY-2017.npz" in message and "features-processed-NY-2017.pt" in message
    assert "no public copy" in message and "X_train" in message and "weights_only=True" in message


@pytest.fixture
def hmda_dir(tmp_path, data_dir):
    (tmp_path / "hmda").mkdir()
    shutil.copy(data_dir / "hmda/targets-processed-NY-2017.npz", tmp_path / "hmda")
    return tmp_path


def test_hmda_with_user_features_trains(hmda_dir):
    from orderlab.tasks.hmda import load_labels

    y_train, _ = load_labels(hmda_dir)
    generator = np.random.default_rng(0)
    signal = (y_train - 0.5)[:, None] * np.array([[2.0, 0.0, -1.0]])
    x_train = (signal + generator.normal(size=(195285, 3))).astype(np.float32)
    np.savez(hmda_dir / "hmda/features-processed-NY-2017.npz", X_train=x_train, X_test=np.zeros((48822, 3)))
    task = make_task("hmda-logreg")
    data = task.load(hmda_dir)
    assert data.train_inputs.shape == (195285, 3) and data.val_inputs.shape == (48822, 3)
    torch.manual_seed(0)
    model = task.make_model()
    assert num_parameters(model) == 4
    assert_per_example_gradients_match(task, model, data.train_inputs[:4], data.train_targets[:4])
    losses = sgd_losses(task, model, data.train_inputs[:512], data.train_targets[:512], lr=0.5)
    assert losses[-1] < losses[0]
    assert task.metric_sum(torch.tensor([[1.0], [-1.0]]), torch.tensor([1.0, 1.0])) == 1.0


def test_hmda_rejects_bad_features(hmda_dir):
    np.savez(
        hmda_dir / "hmda/features-processed-NY-2017.npz",
        X_train=np.zeros((10, 3)),
        X_test=np.zeros((48822, 3)),
    )
    with pytest.raises(OrderlabError, match=r"X_train has shape \(10, 3\); expected \[195285, d\]"):
        make_task("hmda-logreg").load(hmda_dir)
    (hmda_dir / "hmda/features-processed-NY-2017.npz").unlink()
    torch.save(
        (torch.zeros(195285, 3), torch.zeros(48822, 3)), hmda_dir / "hmda/features-processed-NY-2017.pt"
    )
    with pytest.raises(OrderlabError, match="corrupt: git blob .* != expected d7391ecf"):
        make_task("hmda-logreg").load(hmda_dir)  # not CD-GraB's file


def test_hmda_labels_also_load_from_cd_grabs_pt(tmp_path, data_dir):
    from orderlab.tasks.hmda import load_labels

    (tmp_path / "hmda").mkdir()
    shutil.copy(data_dir / "hmda/targets-processed-NY-2017.pt", tmp_path / "hmda")
    from_pt, from_npz = load_labels(tmp_path), load_labels(data_dir)
    assert all(np.array_equal(a, b) for a, b in zip(from_pt, from_npz, strict=True))


# ---------------------------------------------------------------- small tasks and configs


@pytest.mark.parametrize("name", ["digits-logreg", "mnist1d-mlp"])
def test_small_tasks_train(name, data_dir):
    task = make_task(name)
    data = task.load(data_dir)
    torch.manual_seed(0)
    losses = sgd_losses(task, task.make_model(), data.train_inputs[:128], data.train_targets[:128])
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("**/*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_config_validates(path):
    cfg = load_config(path)
    points = validate_grid(cfg)
    assert points
    for point in points:
        task = make_task(point.task.name, point.task.options)  # the options exist
        assert point.train.unit in task.supported_units, (path, point.train.unit)


def test_paper_configs_sweep_the_orderings_and_seeds():
    papers = sorted((CONFIGS / "paper").glob("*.yaml"))
    assert len(papers) >= 5
    for path in papers:
        sweep = load_config(path).sweep.axes
        # rr (D-RR), pair-balance (ID-GraB) and cd-grab; grab too, except in the worker-scaling study
        expected = {"rr", "pair-balance", "cd-grab"} | ({"grab"} if "train" not in sweep else set())
        assert expected <= set(sweep["ordering.name"]), path
        assert sweep["seed"] == [0, 1, 2], path


def test_wikitext2_train_tokens_is_a_prefix_subset(data_dir):
    from orderlab.errors import OrderlabError

    full = make_task("wikitext2-lstm").load(data_dir)
    subset = make_task("wikitext2-lstm", {"train_tokens": 7000}).load(data_dir)
    arranged = make_task("wikitext2-lstm", {"train_tokens": 7000}).arrange(subset, 2, 4)
    # 7000 tokens in 8 columns of 875 tokens -> 24 chunks of 35 (+1 target shift) per column
    assert arranged.train_inputs.shape == (2 * 24 * 4, 35)
    assert torch.equal(subset.extras["train_tokens"], full.extras["train_tokens"][:7000])
    assert torch.equal(subset.val_inputs, full.val_inputs)
    with pytest.raises(OrderlabError, match="train_tokens"):
        make_task("wikitext2-lstm", {"train_tokens": 10})


def test_train_examples_is_a_fixed_subset_in_file_order(m4, data_dir):
    task = make_task("m4-mlp")
    subset = load_task_data(task, str(data_dir), 1000)
    again = load_task_data(task, str(data_dir), 1000)
    assert subset.train_inputs.shape == (1000, *m4.train_inputs.shape[1:])
    assert torch.equal(subset.train_inputs, again.train_inputs)  # the same for every trial and worker
    # rows of the full set, in the files' order, spread over it rather than a prefix
    full_rows = {tuple(row.tolist()) for row in m4.train_inputs}
    assert all(tuple(row.tolist()) in full_rows for row in subset.train_inputs[:50])
    positions = [i for i, row in enumerate(m4.train_inputs) if torch.equal(row, subset.train_inputs[-1])]
    assert positions and positions[0] > len(m4.train_inputs) // 2
    assert torch.equal(subset.val_inputs, m4.val_inputs)  # validation is never subset
    whole = load_task_data(task, str(data_dir), None)
    assert torch.equal(whole.train_inputs, m4.train_inputs)


def test_train_examples_errors_name_the_field(data_dir):
    with pytest.raises(OrderlabError, match=r"task.train_examples=10000 exceeds the 1437"):
        load_task_data(make_task("digits-logreg"), str(data_dir), 10_000)
    with pytest.raises(OrderlabError, match="task.options.train_tokens"):
        load_task_data(make_task("wikitext2-lstm"), str(data_dir), 100)
