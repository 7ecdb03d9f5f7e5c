import json
import subprocess
import sys

import pytest

from netcarve.cli.main import build_parser, main


def test_every_subcommand_has_help(capsys):
    p = build_parser()
    subs = p._subparsers._group_actions[0].choices
    assert {"demo", "models", "eval", "profile", "train"} <= set(subs)
    for name in subs:
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        assert "usage: netcarve " + name in capsys.readouterr().out


def test_models_json(capsys):
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    names = {r["name"] for r in rows}
    assert {"resnet20", "resnet56", "resnet8", "lenet", "vgg16_bn", "mobilenetv2", "lstm", "gru"} <= names


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["profile", "no_such_model", "--no-layers"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("netcarve: error:") and "no_such_model" in err and "resnet20" in err


def test_non_checkpoint_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["eval", str(tmp_path), "--json"]) == 2
    assert "not a netcarve checkpoint" in capsys.readouterr().err


def test_console_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "netcarve", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("netcarve ")
