"""examples/pure-qwen2.5-math-7b.yaml, the values of README "Training a real model": it renders
over the GPU cluster example, and the settings files it gives the learner and the services are
what the README says (PURE's prompt, grader and data setting, the S1 defaults) and load in the
code's settings models."""

from __future__ import annotations

import yaml
from chartkit import EXAMPLES, find, render

from puremesh.contract.steps import Readout
from puremesh.services.prm.settings import PrmSettings
from puremesh.services.verify.grading import Grader
from puremesh.services.verify.settings import VerifySettings
from puremesh.trainer.data import PURE_TEMPLATE
from puremesh.trainer.settings import LearnerSettings

VALUES = (EXAMPLES / "gpu-cluster.yaml", EXAMPLES / "pure-qwen2.5-math-7b.yaml")


def settings_files() -> dict[str, dict]:
    [config] = [d for d in find(render(VALUES), "ConfigMap") if "learner.yaml" in d.get("data", {})]
    return {name: yaml.safe_load(text) for name, text in config["data"].items() if name.endswith(".yaml")}


def test_the_pure_example_renders_into_valid_settings() -> None:
    files = settings_files()
    learner = LearnerSettings.model_validate(files["learner.yaml"]["learner"])
    assert learner.prompt.prompt_template().format == PURE_TEMPLATE and not learner.prompt.chat_template
    assert learner.ground_truth_fraction == 0.1
    assert (learner.algo.credit, learner.algo.temperature, str(learner.algo.reward_mode)) == (
        "min",
        0.1,
        "prm+vr",
    )
    s1 = (learner.optim.lr, learner.optim.betas, learner.optim.minibatches, learner.sampling.temperature)
    assert s1 == (5e-7, (0.9, 0.95), 2, 0.5)
    assert (learner.sampling.prompts_per_step, learner.sampling.samples_per_prompt) == (64, 4)
    prm = PrmSettings.model_validate(files["prm.yaml"])
    assert prm.model_path == "/models/prm" and prm.readout is Readout.DIFFERENCE and prm.step_tag is None
    assert VerifySettings.model_validate(files["verify.yaml"]).grader is Grader.PURE


def test_a_newline_step_tag_reaches_the_ray_apps_and_the_configmap(tmp_path) -> None:
    """prm.step_tag "\\n" (PURE's layout, written out) arrives intact in serveConfigV2 and in the
    ConfigMap: a YAML round trip inside the chart once turned it into ""."""
    values = tmp_path / "tag.yaml"
    values.write_text(yaml.safe_dump({"services": {"prm": {"settings": {"step_tag": "\n"}}}}))
    docs = render((*VALUES, values))
    serve = yaml.safe_load(find(docs, "RayService")[0]["spec"]["serveConfigV2"])
    [prm_app] = [app for app in serve["applications"] if app["name"] == "prm"]
    assert PrmSettings.model_validate(prm_app["args"]["settings"]).step_tag == "\n"
    [config] = [d for d in find(docs, "ConfigMap") if "prm.yaml" in d.get("data", {})]
    assert yaml.safe_load(config["data"]["prm.yaml"])["step_tag"] == "\n"
