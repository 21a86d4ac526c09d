"""The command line: each run setting declared once (RunSettings), every option documented with its default."""

from __future__ import annotations

import argparse
from dataclasses import fields

import pytest

from common.data.datasets import load_dataset
from common.federation import RunSettings
from common.recipe import PublicFacts, choose_recipe, simulated_estimate
from simulations.cli import _run_settings, build_parser, main


def _parsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    found = [(parser.prog, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += _parsers(child)
    return found


def test_every_option_of_every_command_has_a_help_line() -> None:
    missing = [
        f"{prog} {action.option_strings[0]}"
        for prog, parser in _parsers(build_parser())
        for action in parser._actions
        if action.option_strings and not action.help
    ]
    assert not missing


def test_simulate_with_no_options_runs_the_declared_defaults(tmp_path) -> None:
    args = build_parser().parse_args(["simulate", "--out", str(tmp_path / "run")])
    settings = _run_settings(args, "synthetic:users=200,items=80", str(tmp_path / "run"))
    defaults = RunSettings()
    for declared in fields(RunSettings):
        if declared.metadata["cli"]:
            assert getattr(settings, declared.name) == getattr(defaults, declared.name), declared.name


@pytest.mark.parametrize(
    ("option", "value", "setting", "expected"),
    [("--clip", "0.5", "max_grad_norm", 0.5), ("--lr", "0.01", "learning_rate", 0.01),
     ("--partition", "taste", "partitioning", "taste"), ("--server-lr", "0.3", "server_learning_rate", 0.3),
     ("--max-physical-batch", "8", "max_physical_batch_size", 8), ("--sample-rate", "0.2", "sample_rate", 0.2),
     ("--hidden", "32", "hidden", 32)],
)
def test_each_option_sets_its_run_setting(tmp_path, option: str, value: str, setting: str, expected: object) -> None:
    args = build_parser().parse_args(["simulate", "--out", str(tmp_path / "run"), option, value])
    assert getattr(_run_settings(args, "synthetic:users=200,items=80", str(tmp_path / "run")), setting) == expected


@pytest.mark.parametrize("noise", ["central", "distributed"])
def test_a_one_noise_placement_fills_what_is_not_given_from_its_recipe(tmp_path, noise: str) -> None:
    out = str(tmp_path / "run")
    args = build_parser().parse_args(["simulate", "--out", out, "--noise", noise, "--rounds", "7", "--min-sites", "3"])
    settings = _run_settings(args, "synthetic:users=200,items=80", out)
    data = load_dataset("synthetic:users=200,items=80")
    recipe = choose_recipe(PublicFacts(simulated_estimate(data), 80, 5, RunSettings.epsilon, RunSettings.delta))
    assert settings.rounds == 7, "given wins"
    assert (settings.sample_rate, settings.batch_size, settings.evaluate_every, settings.server_learning_rate) == (
        recipe.sample_rate, recipe.batch_size, recipe.evaluate_every, recipe.server_learning_rate), "the rule fills"
    assert settings.user_update == RunSettings.user_update == "gradient", "one clipped gradient per user"
    estimated = build_parser().parse_args(
        ["simulate", "--out", out, "--noise", noise, "--min-sites", "3", "--users-estimate", "50000"])
    larger = _run_settings(estimated, "synthetic:users=200,items=80", out)
    assert larger.rounds > recipe.rounds and larger.batch_size == round(larger.sample_rate * 50000), \
        "a stated public estimate, not the data's count, sizes the recipe"
    assert settings.item_tables == "tied" and settings.model_config(10).tied_items
    assert settings.max_grad_norm == RunSettings.max_grad_norm, "settings outside the recipe keep their declaration"
    site = _run_settings(build_parser().parse_args(["simulate", "--out", out]), "synthetic:users=200,items=80", out)
    assert (site.rounds, site.sample_rate, site.evaluate_every, site.item_tables) == (10, 0.1, 1, "tied")


def test_no_dp_turns_dp_off(tmp_path) -> None:
    args = build_parser().parse_args(["simulate", "--out", str(tmp_path / "run"), "--no-dp"])
    assert _run_settings(args, "synthetic:users=200,items=80", str(tmp_path / "run")).dp is False


def test_help_says_what_fedtail_is_and_version_answers(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "fedtail: federated, privacy-preserving sequential recommendation" in capsys.readouterr().out
    with pytest.raises(SystemExit) as ended:
        main(["--version"])
    assert ended.value.code == 0 and capsys.readouterr().out.startswith("fedtail ")
    with pytest.raises(SystemExit):
        main(["simulate", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.0)" in shown, "help shows defaults"
    assert "(default: 0.1; noise=central or distributed: the recipe rule's choice" in shown, "and the recipe's"


def test_recipe_prints_the_rules_choice_as_run_config_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipe", "--users-estimate", "6000", "--items", "3400", "--epsilon", "8"]) == 0
    printed = capsys.readouterr().out
    recipe = choose_recipe(PublicFacts(6000, 3400, 5, 8.0, RunSettings.delta))
    assert f"rounds={recipe.rounds} sample-rate={recipe.sample_rate} batch-size={recipe.batch_size}" in printed
    assert "about 6,000 users (public estimate)" in printed and "user-update" not in printed
    assert main(["recipe", "--epsilon", "8"]) == 2, "no estimate: a named error, not a recipe"
    assert "users estimate 0" in capsys.readouterr().err
