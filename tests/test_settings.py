"""pneumonia_vit.settings: the environment as app.py and predict.py read it, with one idea of "off"."""

from __future__ import annotations

from pathlib import Path

import pytest

from pneumonia_vit.settings import DEFAULT_MAX_WAITING, OFF, ServingSettings


def test_unset_environment_gives_the_defaults():
    assert ServingSettings.from_environment({}) == ServingSettings(
        model_id=None, fast=True, cache=None, threads=None
    )


@pytest.mark.parametrize("word", [*OFF, "OFF", " False "])
def test_every_off_word_turns_off_the_fast_path(word):
    assert ServingSettings.from_environment({"PNEUMONIA_VIT_FAST": word}).fast is False


@pytest.mark.parametrize("word", ["", "1", "on", "yes", "true"])
def test_any_other_word_leaves_the_fast_path_on(word):
    assert ServingSettings.from_environment({"PNEUMONIA_VIT_FAST": word}).fast is True


def test_model_cache_and_threads_reach_the_loaders():
    settings = ServingSettings.from_environment(
        {"MODEL_ID": "you/pneumonia-vit", "PNEUMONIA_VIT_CACHE": "/tmp/fast", "PNEUMONIA_VIT_THREADS": "0"}
    )
    assert settings.model_id == "you/pneumonia-vit"
    assert settings.fast_path() == {"fast": True, "cache": Path("/tmp/fast"), "threads": 1}


def test_queue_length_is_read_and_a_bad_one_named_in_the_error():
    assert ServingSettings.from_environment({}).max_waiting == DEFAULT_MAX_WAITING
    assert ServingSettings.from_environment({"PNEUMONIA_VIT_QUEUE": "256"}).max_waiting == 256
    for bad in ("0", "many"):
        with pytest.raises(ValueError, match=f"PNEUMONIA_VIT_QUEUE='{bad}'"):
            ServingSettings.from_environment({"PNEUMONIA_VIT_QUEUE": bad})
