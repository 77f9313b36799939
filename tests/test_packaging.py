"""The package as users install it: a built wheel, installed without -e into a fresh virtualenv, carries its
defaults and runs the ``infer`` command; ``python_requires`` says the Python it works on."""

from __future__ import annotations

import configparser
import subprocess
import sys
import venv
from pathlib import Path

from conftest import uip_config_dict, write_dataset
from test_cli import as_flags

REPO = Path(__file__).resolve().parent.parent


def test_a_built_wheel_installed_without_editable_mode_runs_infer(tmp_path, tiny_llm_dir):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(REPO)], check=True, cwd=tmp_path)
    wheel = next(wheels.glob("recbole_uip-*.whl"))
    # The environment's packages (torch, RecBole, ...) are visible; recbole-uip itself comes from the wheel only.
    env = tmp_path / "env"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env)
    python = env / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, cwd=tmp_path)
    located = subprocess.run([str(python), "-c", "import recbole_uip.config as c; print(c.DEFAULTS_FILE)"],
                             check=True, capture_output=True, text=True, cwd=tmp_path).stdout.strip()
    assert located.startswith(str(env)) and Path(located).is_file()        # the wheel's copy, not the checkout's

    write_dataset(tmp_path / "data", n_users=8, per_user=5)
    config = uip_config_dict(tmp_path, tiny_llm_dir, uip_epochs=1, uip_line_search_users=2)
    run = subprocess.run([str(python), "-m", "recbole_uip", "infer", "--dataset=toy", *as_flags(config)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    target = Path(run.stdout.strip().splitlines()[-1])
    assert (target / "toy-uip.user").is_file() and (target / "bank" / "bank.json").is_file()
    keys = subprocess.run([str(python), "-m", "recbole_uip", "keys"], check=True, capture_output=True, text=True,
                          cwd=tmp_path).stdout
    assert "uip_encoder:" in keys and "uip_max_behaviour_tokens:" in keys


def test_python_requires_matches_the_python_recbole_resolves_on():
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert setup["options"]["python_requires"] == ">=3.11,<3.12"
