"""Every user mistake of issue #10 is one line on stderr (exit status 2) that names the problem and the fix,
with no traceback, and leaves no run directory behind; FEATKD_DEBUG=1 shows the traceback."""

import gzip
import pickle

import numpy as np
import pytest

from featkd import checkpoint as ckpt
from featkd.cli import main
from featkd.locking import lock_path

pytestmark = pytest.mark.slow

REAL_FMNIST = "/usr/share/datasets/fashion-mnist"
DATA = ["data.name=synthetic", "data.limit=64", "data.test_limit=32", "data.batch_size=16", "data.eval_batch_size=32"]


def one_line_error(capsys, status, *fragments):
    """The status is 2 and stderr is one line holding every fragment; returns that line."""
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and err.startswith("featkd ") and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("errors") / "teacher"
    assert main(["train", "--run-dir", str(run_dir), "model.name=wrn10_2", "epochs=1", "schedule.name=constant",
                 *DATA]) == 0
    return run_dir / "best.pt"


# The shipped config's terms: 0-2 AT on group1-3, 3 NST (poly) on group3; kd with T=4.
@pytest.mark.parametrize("overrides, fragments", [
    (["kd.options.T=-4"], ["kd loss 'kd'", "temperature T must be > 0, got -4"]),
    (["terms.3.options.kernel=gaussian", "terms.3.options.sigma2=-1"], ["term 'nst:group3'", "sigma2 must be > 0"]),
    (["terms.3.options.degree=-1"], ["NST poly kernel: degree must be a positive integer, got -1"]),
    (["terms.3.options.degree=2.5"], ["NST poly kernel: degree must be a positive integer, got 2.5"]),
    (["terms.0.options.p=0"], ["term 'at:group1'", "AT exponent p must be > 0, got 0"]),
    (["epochs=0"], ["config key 'epochs' must be at least 1, got 0"]),
    (["epochs=-3"], ["config key 'epochs' must be at least 1, got -3"]),
    (["data.batch_size=0"], ["config key 'data.batch_size' must be at least 1, got 0"]),
    (["terms.1.teacher=grop2"], ["teacher WideResNet: the model has no module named 'grop2'",
                                 "Closest existing names: group2", "featkd layers <model>"]),
    (["terms.1.student=block*"], ["student WideResNet: no module matches the pattern 'block*'"]),
    (["terms=[{teacher: group3, student: group1, loss: at, adapter: null}]"],
     ["at compares features at the same positions", "adapter: null asks for none, and adapter: auto (the default) "
      "would fit"]),
    (["terms.3.options.kernel=gausian"], ["unknown NST kernel 'gausian'. Did you mean 'gaussian'?"]),
    (["terms.0.student_layout=NWHC"], ["term 'at:group1'", "unknown layout 'NWHC'; choose one of 'NCHW'", "'NHWC'"]),
    (["terms.0.teacher_layout=tokens"], ["term 'at:group1': teacher layer 'group1': layout 'NLC' expects (B, N, C)",
                                         "a 4-d feature is one of NCHW, NHWC; set teacher_layout"]),
    (["terms.0.layout={kind: NLC, tokens: cls}"], ["unknown token selection 'cls'; choose one of patch, prefix, all"]),
    (["optim.lr=[0.1"], ["override 'optim.lr=[0.1'", "not valid YAML", "close its brackets"]),
    # issue #19: these trained to a wrong result with exit status 0
    (["terms.0.weight=-1000"], ["config key 'terms.0.weight' must be at least 0, got -1000.0"]),
    (["kd.weight=-16"], ["config key 'kd.weight' must be at least 0, got -16.0"]),
    (["grad_clip=-1"], ["config key 'grad_clip' must be > 0, got -1.0"]),
    (["schedule.gamma=-1"], ["config key 'schedule.gamma' must be > 0, got -1.0"]),
    (["optim.lr=0"], ["config key 'optim.lr' must be > 0, got 0.0"]),
    (["optim.momentum=-0.5"], ["config key 'optim.momentum' must be in [0, 1), got -0.5"]),
    (["data.limit=0"], ["config key 'data.limit' must be at least 1, got 0"]),
    (["terms.0.layout=NHWC"], ["term 'at:group1': student layer 'group1': student_layout NHWC given, which reads the "
                               "shape (2, 16, 28, 28) as 28 channels on a 16x28 grid, but the model states NCHW (16 "
                               "channels on a 28x28 grid); leave student_layout (and layout, which sets both sides) "
                               "unset"]),
    (["student.options.bn_inti=uniform"], ["featkd distill: error: model 'wrn10_1' has no option 'bn_inti'. Did you "
                                           "mean 'bn_init'? The options WideResNet takes: dropout, bn_init"]),
    (["amp=fp16", "device=cpu"], ["featkd distill: error: amp=fp16 needs a CUDA device, and this run is on the cpu: "
                                  "set amp=bf16 or amp=null there"]),
    (["data.options.noise=.nan"], ["dataset 'synthetic': option noise (data.options.noise in a config) must be a "
                                   "finite number >= 0", "got nan"]),
    (["schedule.name=multistep"], ["config key 'schedule.milestones' [60, 120, 160] must lie inside the run (each <= "
                                   "epochs=30)", "schedule.name=cosine"]),
])
def test_invalid_settings_are_one_line_before_any_run_directory(teacher, tmp_path, capsys, overrides, fragments):
    run_dir = tmp_path / "run"
    status = main(["distill", "--config", "fmnist_distill_kd_at_nst", "--run-dir", str(run_dir),
                   f"teacher.checkpoint={teacher}", "student.name=wrn10_1", *DATA, *overrides])
    one_line_error(capsys, status, *fragments)
    assert not run_dir.exists() and not lock_path(run_dir).exists()


def test_mistakes_in_a_config_file(teacher, tmp_path, capsys):
    config = tmp_path / "kernel.yaml"
    config.write_text(f"teacher: {{checkpoint: {teacher}}}\nstudent: {{name: wrn10_1}}\n"
                      "terms:\n  - {teacher: group3, loss: nst, options: {kernel: gausian}}\n")
    status = main(["distill", "--config", str(config), "--run-dir", str(tmp_path / "a"), *DATA])
    one_line_error(capsys, status, "unknown NST kernel 'gausian'. Did you mean 'gaussian'?")

    config.write_text("student: {name: wrn10_1}\nterms:\n  - {teacher: group3, loss: nst\n    weight: 50\n")
    status = main(["distill", "--config", str(config), "--run-dir", str(tmp_path / "b"), *DATA])
    one_line_error(capsys, status, f"{config} is not valid YAML", "line 4, column 11")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_sweep_grid_mistakes(teacher, tmp_path, capsys):
    base = ["sweep", "--config", "fmnist_distill_kd_at_nst", f"teacher.checkpoint={teacher}", "student.name=wrn10_1",
            *DATA]
    status = main([*base, "--run-dir", str(tmp_path / "a"), "--grid", "terms.3.options.kernel=linear,gausian"])
    one_line_error(capsys, status, "sweep member kernel=gausian:", "Did you mean 'gaussian'?")
    status = main([*base, "--run-dir", str(tmp_path / "b"), "--grid", "seed=0,0"])
    one_line_error(capsys, status, "grid values for 'seed' repeat 0", "list each value once")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_teacher_of_another_architecture_than_it_records(teacher, tmp_path, capsys):
    state = ckpt.load_checkpoint(teacher)
    state["models"]["model"]["name"] = "wrn16_2"  # the record no longer matches the wrn10_2 weights it holds
    edited = tmp_path / "edited.pt"
    ckpt.save_checkpoint(edited, state)
    status = main(["distill", "--config", "fmnist_distill_kd_at_nst", "--run-dir", str(tmp_path / "run"),
                   f"teacher.checkpoint={edited}", "student.name=wrn10_1", *DATA])
    one_line_error(capsys, status, f"{edited} records a wrn16_2 but holds the weights of another architecture",
                   "weights missing, e.g. 'group1.1.", "train it again")


def test_resuming_after_the_teacher_file_changed_architecture(teacher, tmp_path, capsys):
    copy = tmp_path / "teacher.pt"
    copy.write_bytes(teacher.read_bytes())
    run_dir = tmp_path / "run"
    assert main(["distill", "--config", "fmnist_distill_kd_at_nst", "--run-dir", str(run_dir),
                 f"teacher.checkpoint={copy}", "student.name=wrn10_1", "epochs=1", *DATA]) == 0
    other = tmp_path / "other"
    assert main(["train", "--run-dir", str(other), "model.name=wrn10_1", "epochs=1", "schedule.name=constant",
                 *DATA]) == 0
    copy.write_bytes((other / ckpt.BEST).read_bytes())  # the teacher's file now holds a narrower network
    capsys.readouterr()
    status = main(["distill", "--run-dir", str(run_dir), "--resume"])
    one_line_error(capsys, status, f"cannot resume {run_dir}: the distiller in its checkpoint is of another "
                   "architecture than this run's", "of another shape, e.g. 'teacher.", "start a new run")
    assert len(ckpt.read_metrics(run_dir)) == 1


def test_debug_switch_shows_the_traceback(teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("FEATKD_DEBUG", "1")
    with pytest.raises(ValueError, match="temperature T must be > 0"):
        main(["distill", "--config", "fmnist_distill_kd_at_nst", "--run-dir", str(tmp_path / "run"),
              f"teacher.checkpoint={teacher}", "student.name=wrn10_1", "kd.options.T=-4", *DATA])


# ----------------------------------------------------------------------------- damaged files


def test_damaged_fashion_mnist_files_are_named(tmp_path, capsys):
    train = ["model.name=wrn10_1", "data.name=fashion_mnist"]
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    images = (f"{REAL_FMNIST}/train-images-idx3-ubyte.gz", truncated / "train-images-idx3-ubyte.gz")
    images[1].write_bytes(open(images[0], "rb").read()[:100_000])  # a download cut short
    (truncated / "train-labels-idx1-ubyte.gz").write_bytes(open(f"{REAL_FMNIST}/train-labels-idx1-ubyte.gz", "rb").read())
    status = main(["train", "--run-dir", str(tmp_path / "a"), *train, f"data.root={truncated}"])
    one_line_error(capsys, status, f"{images[1]} cannot be read: it is truncated or damaged",
                   "apt-get install --reinstall dataset-fashion-mnist")

    short_labels = tmp_path / "short_labels"
    short_labels.mkdir()
    (short_labels / "train-images-idx3-ubyte.gz").symlink_to(images[0])
    labels = gzip.open(f"{REAL_FMNIST}/train-labels-idx1-ubyte.gz").read()
    with gzip.open(short_labels / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write(labels[:-10])  # the header still says 60000 labels
    status = main(["train", "--run-dir", str(tmp_path / "b"), *train, f"data.root={short_labels}"])
    one_line_error(capsys, status, f"{short_labels / 'train-labels-idx1-ubyte.gz'}: header says shape (60000,)",
                   "holds 59990", "truncated or damaged")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_damaged_cifar_pickles_are_named(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    good = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    for name in ["data_batch_1", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        (folder / name).write_bytes(pickle.dumps(good, protocol=2))
    (folder / "data_batch_2").write_bytes(pickle.dumps(good, protocol=2)[:50])
    status = main(["train", "--run-dir", str(tmp_path / "run"), "model.name=wrn10_1", "data.name=cifar10",
                   f"data.root={tmp_path}"])
    one_line_error(capsys, status, f"{folder / 'data_batch_2'} is not a readable cifar10 batch",
                   "extract it again from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")


def test_damaged_checkpoints_say_whether_the_other_one_can_be_used(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), "model.name=wrn10_1", "epochs=1", "schedule.name=constant",
                 *DATA]) == 0
    last = run_dir / ckpt.LAST
    last.write_bytes(last.read_bytes()[:1000])
    capsys.readouterr()
    status = main(["train", "--run-dir", str(run_dir), "--resume", "epochs=2"])
    one_line_error(capsys, status, f"checkpoint '{last}' cannot be read: it is truncated or damaged",
                   f"{run_dir / ckpt.BEST} is intact (epoch 1)", "copy it over last.pt to resume from epoch 1")
    status = main(["eval", "--run-dir", str(run_dir), "--which", "last"])
    one_line_error(capsys, status, f"checkpoint '{last}' cannot be read", "featkd eval --run-dir")
    # the hint is a command that works, not the one that failed
    err_hint = f"evaluate it with featkd eval --run-dir {run_dir} --which best"
    status = main(["eval", "--run-dir", str(run_dir)])
    one_line_error(capsys, status, err_hint)
    assert main(["eval", "--run-dir", str(run_dir), "--which", "best"]) == 0

    (run_dir / ckpt.BEST).write_bytes(b"not a checkpoint at all\n" * 10)
    status = main(["train", "--run-dir", str(run_dir), "--resume", "epochs=2"])
    one_line_error(capsys, status, f"checkpoint '{last}' cannot be read",
                   "best.pt cannot be read either: nothing in", "start the run again")
    (run_dir / ckpt.BEST).unlink()
    status = main(["eval", "--run-dir", str(run_dir), "--which", "best"])
    one_line_error(capsys, status, f"checkpoint '{run_dir / ckpt.BEST}' does not exist.",
                   "last.pt cannot be read either")


def test_plot_names_its_own_flag(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "--run-dir", str(run_dir), "model.name=wrn10_1", "epochs=1", "schedule.name=constant",
                 *DATA]) == 0
    out = tmp_path / "curves"
    assert main(["plot", "curves", str(run_dir), "--out", str(out)]) == 0
    capsys.readouterr()
    status = main(["plot", "curves", str(run_dir), "--out", str(out)])
    err = one_line_error(capsys, status, "not overwriting", "--overwrite")
    assert "overwrite=True from Python" in err  # the library's spelling only as the aside


def test_a_run_directory_given_as_the_teacher_points_to_its_last_pt(tmp_path, capsys):
    # issue #19 §2: the hint named best.pt, the epoch chosen on the test set, though teachers come from last.pt
    teacher = tmp_path / "teacher"
    assert main(["train", "--run-dir", str(teacher), "model.name=wrn10_1", "epochs=1", "schedule.name=constant", *DATA]) == 0
    capsys.readouterr()
    distill = ["distill", "--config", "fmnist_distill_kd_at_nst", "--run-dir", str(tmp_path / "student"), *DATA,
               "student.name=wrn10_1", "epochs=1", "terms=[]"]
    status = main([*distill, f"teacher.checkpoint={teacher}"])
    one_line_error(capsys, status, f"It is a run directory; pass {teacher / 'last.pt'} instead")
    assert main([*distill, f"teacher.checkpoint={teacher / 'last.pt'}"]) == 0
