from pathlib import Path

import yaml
from prefect import Flow

from condense.compare import load_comparison
from condense.configure import load_config

ROOT = Path(__file__).resolve().parents[1]


def test_prefect_yaml_deploys_the_flows_with_valid_presets():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert spec["deployments"]
    for deployment in spec["deployments"]:
        module_path, _, name = deployment["entrypoint"].partition(":")
        assert (ROOT / module_path).is_file()
        module = __import__(module_path.removesuffix(".py").replace("/", "."), fromlist=[name])
        assert isinstance(getattr(module, name), Flow)
        params = deployment["parameters"]
        overrides = [o for o in params["overrides"] if "{{" not in o]
        if name == "compare":
            assert len(load_comparison(params["preset"], overrides=overrides).cells) > 1
        else:
            assert load_config(params["preset"], overrides).method == "mtt"
