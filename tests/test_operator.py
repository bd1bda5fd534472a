"""What an operator meets: runs that mean what they say, one-line errors before any budget is spent,
honest progress, and reports a non-expert can read."""

from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from fedsynth.cli import main
from tests.spine_helpers import FAST_CLI as FAST


def _folder(root, mode="L", size=8, classes=("cat", "dog"), per_class=12, odd=None):
    """An image folder root/<class>/*.png; ``odd`` = (class, mode) of one image in another mode."""
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new(mode, (size, size), color=(i * 9) % 255 if mode == "L" else ((i * 9) % 255,) * 3).save(
                root / cls / f"{i}.png")
    if odd:
        Image.new(odd[1], (size, size), color=(200, 10, 10)).save(root / odd[0] / "odd.png")
    return root


# ---- runs mean what they say -------------------------------------------------------------------------

def test_a_flag_and_a_set_of_the_same_setting_must_agree(tmp_path, capsys):
    code = main(["simulate", "--data", "digits", "--mode", "dpgan", "--set", "mode=bnstats", "--out", str(tmp_path)])
    assert code == 2 and "--mode dpgan and --set mode=bnstats disagree" in capsys.readouterr().err
    assert main(["simulate", "--data", "digits", "--epsilon", "5", "--set", "epsilon=5.0", "--out",
                 str(tmp_path / "ok"), "--rounds", "1", *FAST]) == 0  # the same value twice is fine


def test_rounds_are_the_modes_rounds(tmp_path):
    from fedsynth.cli import build_parser, build_run_config

    args = build_parser().parse_args(["simulate", "--data", "digits", "--mode", "bnstats", "--rounds", "1"])
    cfg = build_run_config(args)
    assert cfg.bn_rounds == 1  # in the statistics mode --rounds is its net rounds
    code = main(["simulate", "--data", "digits", "--test", "digits", "--mode", "bnstats", "--rounds", "1",
                 "--out", str(tmp_path), "--set", "bn-iterations=2", "--set", "bn-synth-batch=50", *FAST])
    assert code == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["num_rounds"] == 1 and [h["round"] for h in report["rounds"]] == [1]


def test_the_learner_has_one_default_for_runs_and_evaluate():
    from common.config import RunConfig
    from common.learner import LearnerConfig
    from fedsynth.cli import build_parser

    args = build_parser().parse_args(["evaluate", "--synthetic", "x", "--test", "digits", "--out", "o"])
    assert RunConfig().learner_config() == LearnerConfig() and args.learner_lr == LearnerConfig().lr


# ---- everything checked before any budget is spent -------------------------------------------------------

def test_a_test_set_that_does_not_match_the_training_data_is_refused_before_any_site_spends(tmp_path, capsys):
    train = _folder(tmp_path / "train", odd=("cat", "RGB"))  # one RGB image makes the set RGB
    test = _folder(tmp_path / "test")  # all grayscale
    code = main(["simulate", "--data", str(train), "--test", str(test), "--sites", "2", "--out", str(tmp_path / "o"),
                 *FAST])
    err = capsys.readouterr().err
    assert code == 2 and "does not match the training data" in err and "(3, 8, 8)" in err and "(1, 8, 8)" in err
    assert not (tmp_path / "o" / "sites").exists()  # no site was asked anything


def test_a_folder_given_as_test_data_is_the_test_data(tmp_path):
    from common.data import DataError, load_dataset

    flat = _folder(tmp_path / "flat")
    with pytest.raises(DataError, match="no 'test' split"):
        load_dataset(flat, "test")  # without being told, a flat folder has only its train split
    assert len(load_dataset(flat, "test", whole=True)) == 24
    code = main(["simulate", "--data", str(_folder(tmp_path / "train", per_class=20)), "--test", str(flat),
                 "--sites", "2", "--rounds", "1", "--out", str(tmp_path / "o"), *FAST])
    assert code == 0
    assert json.loads((tmp_path / "o" / "report.json").read_text())["utility"]["num_test"] == 24


def test_the_same_unsplit_folder_as_data_and_test_is_refused(tmp_path, capsys):
    flat = _folder(tmp_path / "flat")
    code = main(["simulate", "--data", str(flat), "--test", str(flat), "--sites", "2", "--out", str(tmp_path / "o"), *FAST])
    assert code == 2 and "the test records would be the training records" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["single-class", "cuda", "out-is-a-file"])
def test_user_mistakes_are_one_line_and_exit_2(tmp_path, capsys, case):
    import torch

    if case == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    args = ["simulate", "--data", "digits", "--out", str(tmp_path / "o"), *FAST]
    if case == "single-class":
        args[2] = str(_folder(tmp_path / "one", classes=("only",)))
    elif case == "cuda":
        args += ["--device", "cuda"]
    else:
        (tmp_path / "file").write_text("x")
        args[4] = str(tmp_path / "file")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and err.startswith("fedsynth: error:")


def test_ledger_view_of_a_simulation_reads_and_never_writes(tmp_path, capsys):
    assert main(["ledger", "--state-dir", str(tmp_path)]) == 0
    assert "no ledger yet" in capsys.readouterr().out and not any(tmp_path.iterdir())
    assert main(["simulate", "--data", "digits", "--sites", "2", "--rounds", "1", "--out", str(tmp_path / "run"),
                 *FAST]) == 0
    capsys.readouterr()
    assert main(["ledger", "--state-dir", str(tmp_path / "run" / "sites")]) == 0
    text = capsys.readouterr().out
    assert text.count("dataset id site-") == 2 and "spent epsilon" in text


# ---- fedsynth evaluate ------------------------------------------------------------------------------------

def test_evaluate_takes_image_folders_and_refuses_a_size_mismatch_unless_asked(tmp_path, capsys, shared_data):
    from common.data import load_dataset, save_image_folder

    synthetic = tmp_path / "synthetic"
    save_image_folder(load_dataset("digits", "train"), synthetic)  # what another tool might write: 8x8 images
    args = ["evaluate", "--synthetic", str(synthetic), "--test", str(shared_data / "mnist"), "--out",
            str(tmp_path / "e"), "--no-audits", "--learner-epochs", "1", "--quiet"]
    assert main(args) == 2
    assert "synthetic images are 8x8 but the test data is 28x28; pass --resize" in capsys.readouterr().err
    assert main(args + ["--resize"]) == 0


# ---- progress and the command line ----------------------------------------------------------------------

def test_progress_without_a_terminal_is_a_few_log_lines(monkeypatch, capsys):
    from common import progress as prog

    monkeypatch.setattr(prog, "LOG_EVERY", 0.0)
    bar = prog.progress(range(5), desc="round", unit="round")  # stderr is captured: not a terminal
    assert isinstance(bar, prog.LogProgress)
    for _ in bar:
        pass
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("round: 5/5 round (100%)") and "ETA" in lines[-1] and "\r" not in "".join(lines)
    monkeypatch.setattr(prog, "LOG_EVERY", 3600.0)
    for _ in prog.progress(range(1000), desc="quiet"):
        pass
    assert len(capsys.readouterr().err.strip().splitlines()) == 1  # one line at the end, not 1000 redraws


def test_version_and_the_list_of_settings(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.startswith("fedsynth ")
    assert main(["settings"]) == 0
    listing = capsys.readouterr().out
    from common.config import describe_settings

    for key, _, meaning in describe_settings():
        assert f"  {key} = " in listing and meaning, key
    assert main(["simulate", "--data", "digits", "--set", "help"]) == 0
    assert "gan-local-steps = 0" in capsys.readouterr().out


# ---- reports a non-expert can read ------------------------------------------------------------------------

def test_the_report_says_what_epsilon_means_and_labels_the_sample_grid(tmp_path, monkeypatch):
    import server.synthesis as synthesis
    from tests.spine_helpers import fast_config, run

    labelled = []
    real_grid = synthesis.save_class_grid
    monkeypatch.setattr(synthesis, "save_class_grid",
                        lambda images, labels, classes, path, **kw: labelled.append(list(classes))
                        or real_grid(images, labels, classes, path, **kw))
    report = run(fast_config(tmp_path, num_rounds=1), k=2)
    statement = report["privacy_statement"]
    assert "Smaller epsilon is stronger privacy" in statement and "(10, 1e-05)" in statement
    assert "delta)" not in statement and math.isfinite(report["delta_bound"])
    html = (tmp_path / "out" / "report.html").read_text()
    assert "&delta; &le; 1e-05" in html and "delta = 0" not in html.lower()
    assert labelled == [[str(i) for i in range(10)]]  # grid_all.png: one row per class, named
    assert (tmp_path / "out" / "grids" / "grid_all.png").exists()


def test_site_check_and_ledger_read_without_writing_a_ledger(tmp_path, capsys):
    import yaml

    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump({"name": "a", "data": "digits", "epsilon": 5.0, "state_dir": str(tmp_path / "state"),
                                   "coordinator": "127.0.0.1:9", "supernode_port": 39999}))
    assert main(["site", "--config", str(cfg), "--check", "--insecure"]) == 0
    assert "nothing released yet" in capsys.readouterr().out
    # the node config a Docker site's SuperNode reads, with the image shape the check pinned (review s58)
    import tomllib
    node = tomllib.loads((tmp_path / "state" / "nodes" / "a" / "node-config.toml").read_text())
    assert (node["image-size"], node["channels"], node["site-name"]) == (8, 1, "a")
    assert main(["ledger", "--config", str(cfg)]) == 0  # "no ledger yet" is an answer, not an error
    assert "no ledger yet" in capsys.readouterr().out
    assert not (tmp_path / "state" / "ledger").exists()


def test_a_site_with_a_weak_delta_a_huge_budget_or_its_state_in_its_data_is_told_so(tmp_path, capsys):
    """Review s60: a delta of 0.5 or a budget of 1e6 in site.yaml was taken without a word, and a state folder inside
    the data folder was made (then seen as a class) before it was refused."""
    import yaml

    data = _folder(tmp_path / "images", per_class=20)  # 40 records: 1/n = 0.025

    def check(**settings) -> tuple[int, str]:
        cfg = tmp_path / "site.yaml"
        cfg.write_text(yaml.safe_dump({"name": "a", "data": str(data), "epsilon": 5.0, "coordinator": "127.0.0.1:9",
                                       "state_dir": str(tmp_path / "state"), "supernode_port": 39999, **settings}))
        code = main(["site", "--config", str(cfg), "--check", "--insecure"])
        out = capsys.readouterr()
        return code, out.out + out.err

    code, text = check(delta=0.5)
    assert code == 2 and "delta 0.5 is at least 1 / (its 40 records)" in text
    code, text = check(delta=1e-3)
    assert code == 0 and "delta 0.001 is above 1e-5, the usual bound" in text
    assert "allow_distributed_noise has no effect" not in text
    code, text = check(delta=1e-3, allow_distributed_noise=True)
    assert code == 0 and "allow_distributed_noise has no effect at delta 0.001" in text
    code, text = check(epsilon=1e6)
    assert code == 0 and "budget of epsilon 1e+06" in text and "says next to nothing" in text
    code, text = check()
    assert code == 0 and "the usual bound" not in text and "says next to nothing" not in text
    code, text = check(state_dir=str(data / "state"))
    assert code == 2 and "lies inside the data folder" in text and not (data / "state").exists()
    # review s61: a budget that cannot pay the noisy size the default delta is read off passed --check, and the site
    # then refused every request; with a delta set it starts
    code, text = check(epsilon=0.02, state_dir=str(tmp_path / "small"))
    assert code == 2 and "epsilon 0.02 cannot pay the noisy size" in text
    code, text = check(epsilon=0.02, delta=1e-6, state_dir=str(tmp_path / "small"))
    assert code == 0
    (tmp_path / "lost" / "ledger").mkdir(parents=True)  # a site whose ledger was lost: its own refusal, not "raise
    (tmp_path / "lost" / "ledger" / "a.started").write_text("{}")  # epsilon" (review s61's seventh helper)
    code, text = check(epsilon=0.02, state_dir=str(tmp_path / "lost"))
    assert code == 2 and "cannot pay the noisy size" not in text and "has released before" in text
    code, text = check(name="a\n")  # a YAML block scalar: NAME_RE.match let its newline through (review s61)
    assert code == 2 and "name" in text


def test_two_supernodes_over_the_same_records_share_the_ledger_and_keep_their_own_files(tmp_path, capsys):
    """Review s60: two SuperNodes over the same records must share one state folder (deploy/README.md), and the
    second's --check rewrote the first's node config (which a Docker SuperNode reads at its next start: secure
    aggregation off, audits on) and its start cleared the first's SecAgg+ stage claims. Each now keeps its files under
    its own name, and a second SuperNode of the same name is refused while the first runs."""
    import os
    import tomllib

    import yaml

    from fedsynth.ops import supernode_guard

    state = tmp_path / "state"

    def check(name: str, **settings) -> int:
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump({"name": name, "data": "digits", "epsilon": 5.0, "state_dir": str(state),
                                       "coordinator": "127.0.0.1:9", "supernode_port": 39999, **settings}))
        return main(["site", "--config", str(cfg), "--check", "--insecure"])

    state.mkdir()
    (state / "node-config.toml").write_text('site-name = "fed0"\n')  # where a site's node config was before s60
    assert check("fed1", require_secure_aggregation=True) == 0
    assert check("fed2") == 2 and "set dataset_id: fed1" in capsys.readouterr().err  # one ledger for the records
    assert check("fed2", dataset_id="fed1") == 0  # (fed1 is not running: its node config is rewritten at its start)
    assert not (state / "node-config.toml").exists()  # moved aside: an old compose path fails instead of reading it
    assert (state / "node-config.toml.pre-s60").read_text() == 'site-name = "fed0"\n'  # kept (review s61)
    node = tomllib.loads((state / "nodes" / "fed1" / "node-config.toml").read_text())
    assert node["site-name"] == "fed1" and node["require-secure-aggregation"] is True  # not fed2's
    running = supernode_guard.lock_node_folder(state / "nodes" / "fed1")  # fed1's SuperNode, running
    try:
        capsys.readouterr()
        assert check("fed1", require_secure_aggregation=True) == 2 \
            and "a SuperNode named 'fed1' runs on state_dir" in capsys.readouterr().err
        with pytest.raises(SystemExit, match="another SuperNode runs with the node files"):
            supernode_guard.hold_node_lock(["--node-config", str(state / "nodes" / "fed1" / "node-config.toml")])
        # one ledger and one runs folder: the two must agree on the privacy settings (review s67: fed2 sent fed1's
        # release, made for a secure sum, in the clear); read as the site reads them (an older config's defaults)
        assert check("fed2", dataset_id="fed1") == 2 and "require_secure_aggregation" in capsys.readouterr().err
        assert check("fed2", dataset_id="fed1", require_secure_aggregation=True) == 0  # another name starts
        # a SuperNode started with an old compose file's path locks the same folder as `fedsynth site` would
        old_style = tmp_path / "old-node-config.toml"
        old_style.write_text(f'state-dir = "{state}"\nsite-name = "fed2"\n')
        supernode_guard.hold_node_lock(["--node-config", str(old_style)])
        capsys.readouterr()
        assert check("fed2", dataset_id="fed1", require_secure_aggregation=True) == 2 \
            and "a SuperNode named 'fed2' runs" in capsys.readouterr().err
        # and a config copied into another site's folder, naming its own site, does not start (it would use one
        # folder under the other's lock)
        (state / "nodes" / "fed3").mkdir(parents=True)
        copied = state / "nodes" / "fed3" / "node-config.toml"
        copied.write_text(f'state-dir = "{state}"\nsite-name = "fed4"\n')
        with pytest.raises(SystemExit, match="names site 'fed4' but sits in the folder of site 'fed3'"):
            supernode_guard.hold_node_lock(["--node-config", str(copied)])
        # nor one in a state folder's nodes/ that names another state folder (review s61: a Docker SuperNode given a
        # config written with the host's paths kept its ledger off its volume)
        elsewhere = tmp_path / "volume" / "nodes" / "fed3" / "node-config.toml"
        elsewhere.parent.mkdir(parents=True)
        elsewhere.write_text(f'state-dir = "{tmp_path / "host-state"}"\nsite-name = "fed3"\n')
        with pytest.raises(SystemExit, match="names state-dir .*host-state, which is not a folder here"):
            supernode_guard.hold_node_lock(["--node-config", str(elsewhere)])
        assert not (tmp_path / "host-state").exists()
        (tmp_path / "host-state").mkdir()  # one that exists: still another state folder than the config's
        with pytest.raises(SystemExit, match="state-dir it names, .*host-state: the site would keep its ledger there"):
            supernode_guard.hold_node_lock(["--node-config", str(elsewhere)])
        # nor by a relative path, '..' or a link (review s61's sixth helper)
        os.symlink(elsewhere, tmp_path / "link.toml")
        for spelled in (str(tmp_path / "link.toml"), str(elsewhere.parent / ".." / "fed3" / "node-config.toml")):
            with pytest.raises(SystemExit, match="the site would keep its ledger there"):
                supernode_guard.hold_node_lock(["--node-config", spelled])
        cwd = os.getcwd()
        os.chdir(elsewhere.parent)
        try:
            with pytest.raises(SystemExit, match="the site would keep its ledger there"):
                supernode_guard.hold_node_lock(["--node-config=node-config.toml"])
        finally:
            os.chdir(cwd)
        # a link in a state folder's nodes/ to a config kept elsewhere, and Flower's abbreviated or repeated option
        # (Flower reads both: review s61's eighth helper)
        (tmp_path / "etc2").mkdir()
        (tmp_path / "etc2" / "node.toml").write_text(f'state-dir = "{tmp_path / "host-state"}"\nsite-name = "fed5"\n')
        (tmp_path / "volume" / "nodes" / "fed5").mkdir()
        os.symlink(tmp_path / "etc2" / "node.toml", tmp_path / "volume" / "nodes" / "fed5" / "node-config.toml")
        for args in (["--node-config", str(tmp_path / "volume" / "nodes" / "fed5" / "node-config.toml")],
                     ["--node-conf", str(elsewhere)], ["--node-config", "/nowhere.toml", "--node-config", str(elsewhere)]):
            with pytest.raises(SystemExit, match="the site would keep its ledger there"):
                supernode_guard.hold_node_lock(args)
        # a [""] table, whose keys Flower's reading (flattened) puts at the top level: the guard reads it the same way
        (tmp_path / "volume" / "nodes" / "fed6").mkdir()
        flat = tmp_path / "volume" / "nodes" / "fed6" / "node-config.toml"
        flat.write_text(f'state-dir = "{tmp_path / "volume"}"\nsite-name = "fed6"\n[""]\nstate-dir = "{tmp_path / "host-state"}"\n')
        with pytest.raises(SystemExit, match="the site would keep its ledger there"):
            supernode_guard.hold_node_lock(["--node-config", str(flat)])
        # two sites whose node configs an operator keeps in one folder of their own (review s60's ninth helper)
        (tmp_path / "etc").mkdir()
        for name in ("s5", "s6"):
            (tmp_path / name).mkdir()  # (their state folders, as --check makes them)
            (tmp_path / "etc" / f"{name}.toml").write_text(f'state-dir = "{tmp_path / name}"\nsite-name = "{name}"\n')
            supernode_guard.hold_node_lock(["--node-config", str(tmp_path / "etc" / f"{name}.toml")])  # both start
    finally:
        os.close(running)
        from fedsynth.ops import node_folder
        while node_folder._held_lock:
            os.close(node_folder._held_lock.pop())
    assert check("fed1", require_secure_aggregation=True) == 0


def test_a_site_whose_held_out_data_is_its_training_data_does_not_start(tmp_path, capsys):
    """Review s59: a folder without train/ and test/ is held out whole, so 'heldout' naming the training folder (or
    its train/ part) passed the config's path check and put every record in both audit histograms (one record moving
    the release by sqrt(2), its noise calibrated to 1). ``fedsynth site`` now refuses to start such a site; a held-out
    split of the same folder starts."""
    import numpy as np
    import yaml

    from common.data import load_dataset

    digits = load_dataset("digits", "train")
    for split, rows in (("train", range(0, 60)), ("test", range(60, 80))):
        for i in rows:
            pixels = np.round(digits.images[i, 0] * 255).astype(np.uint8)
            path = tmp_path / "data" / split / str(int(digits.labels[i])) / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(path)
    data = tmp_path / "data"

    def check(**held) -> int:
        cfg = tmp_path / "site.yaml"
        cfg.write_text(yaml.safe_dump({"name": "a", "data": str(data), "epsilon": 5.0, "coordinator": "127.0.0.1:9",
                                       "state_dir": str(tmp_path / "state"), "supernode_port": 39999, **held}))
        return main(["site", "--config", str(cfg), "--check", "--insecure"])

    for held in ({"heldout": str(data / "train")}, {"heldout": str(data / "train"), "heldout_split": "train"}):
        capsys.readouterr()
        assert check(**held) == 2
        assert "60 of the 60 held-out records are also training records" in capsys.readouterr().err
    assert check(heldout=str(data)) == 0  # its test split: records kept apart
    assert not (tmp_path / "state" / "ledger").exists()
    # a file the site leaves out (it does not decode) is named by the check, not a bare Python warning (R9)
    from client.site import _load_cached

    (data / "train" / "0" / "broken.png").write_bytes(b"not a png")
    _load_cached.cache_clear()  # (one process per `fedsynth site --check`; here they share one)
    capsys.readouterr()
    assert check(heldout=str(data)) == 0
    said = capsys.readouterr()
    assert "site 'a': the data at" in said.out + said.err and "skipped 1 files that are not readable" in said.out + said.err


def test_a_site_whose_machine_rounds_a_record_by_its_batch_mates_does_not_start(tmp_path, capsys, monkeypatch):
    """Review s59: the evaluation's and the audit's sensitivity 1 rests on a record's prediction and distance
    depending on that record alone, checked by the tests on their CPUs only. ``fedsynth site`` now checks it on the
    site's own machine and shape before a site that answers those queries starts (client.row_check)."""
    import torch
    import yaml

    from client import row_check

    cfg = tmp_path / "site.yaml"
    cfg.write_text(yaml.safe_dump({"name": "a", "data": "digits", "heldout": "digits", "epsilon": 5.0,
                                   "evaluation": True, "audits": True, "coordinator": "127.0.0.1:9",
                                   "state_dir": str(tmp_path / "state"), "supernode_port": 39999}))
    assert main(["site", "--config", str(cfg), "--check", "--insecure"]) == 0
    assert "depends on that record alone" in capsys.readouterr().out

    class BatchMean(torch.nn.Module):  # a machine whose kernels let the other rows into each row's result
        def __init__(self, k: int) -> None:
            super().__init__()
            self.head = torch.nn.Linear(64, k)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(x.flatten(1)) + x.mean()

    monkeypatch.setattr(row_check, "build_learner", lambda name, shape, k, **kw: BatchMean(k))
    assert main(["site", "--config", str(cfg), "--check", "--insecure"]) == 2
    err = capsys.readouterr().err
    assert "the cnn classifier's logits of an image change with the other images in its batch" in err
    assert "Set 'evaluation' and 'audits' to false" in err
    assert not (tmp_path / "state" / "ledger").exists()
    # review s62: the training releases rest on the same premise in their fixed blocks (statistics features, DP-SGD
    # per-sample gradients); a machine that weighs a row's loss by its place in the chunk is refused whatever queries
    monkeypatch.undo()
    plain = {k: v for k, v in yaml.safe_load(cfg.read_text()).items() if k != "heldout"}  # (a site without held-out
    cfg.write_text(yaml.safe_dump({**plain, "evaluation": False, "audits": False}))  # records was not checked: s62)
    monkeypatch.setattr(row_check, "nn_cross_entropy", lambda logits, labels: torch.nn.functional.cross_entropy(
        logits, labels, reduction="none") * (1 + 1e-3 * torch.arange(len(labels))))
    assert main(["site", "--config", str(cfg), "--check", "--insecure"]) == 2
    err = capsys.readouterr().err
    assert "per-sample gradient of the shared net changes with the other records in its chunk" in err
    assert "per-sample gradient of the discriminator changes" in err
    real = row_check.iter_record_blocks

    def placed(net, data, **kw):  # features that carry their row's place in the block
        for start, blocks in real(net, data, **kw):
            yield start, {n: b + 1e-9 * torch.arange(len(b), dtype=b.dtype)[:, None] for n, b in blocks.items()}

    monkeypatch.setattr(row_check, "iter_record_blocks", placed)
    assert main(["site", "--config", str(cfg), "--check", "--insecure"]) == 2
    assert "statistics features change with the other records in its block" in capsys.readouterr().err
    assert not (tmp_path / "state" / "ledger").exists()


def test_a_simulation_resumed_over_other_data_is_refused(tmp_path, capsys):
    from common.data import load_dataset, save_npz

    data = tmp_path / "data.npz"
    save_npz(load_dataset("digits", "train"), data)
    args = ["simulate", "--data", str(data), "--sites", "2", "--rounds", "1", "--out", str(tmp_path / "o"), *FAST]
    assert main(args) == 0
    digits = load_dataset("digits", "train")
    save_npz(digits.subset(range(len(digits) - 1)), data)  # the same file name, one record fewer
    capsys.readouterr()
    assert main(args) == 2 and "holds a run over other data" in capsys.readouterr().err
