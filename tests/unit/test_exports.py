"""The public surfaces re-export what they promise, and only names that exist."""

import importlib

import pytest

from cdi.api import DataVolumePhase, PodPhase
from cdi.api import annotations as ann


@pytest.mark.parametrize("module_name", ["cdi.api", "cdi.image.formats"])
def test_all_names_exist(module_name: str) -> None:
    module = importlib.import_module(module_name)
    exported = module.__all__
    assert len(exported) == len(set(exported)), "duplicate names in __all__"
    for name in exported:
        assert hasattr(module, name), f"{module_name}.__all__ names missing {name}"


def test_api_enums_use_cdi_spelling() -> None:
    assert DataVolumePhase.IMPORT_IN_PROGRESS == "ImportInProgress"
    assert DataVolumePhase.WAIT_FOR_FIRST_CONSUMER == "WaitForFirstConsumer"
    assert PodPhase.SUCCEEDED == "Succeeded"
    assert ann.POD_PHASE == "cdi.kubevirt.io/storage.pod.phase"
    assert ann.CLONE_UNIQUE_ID == "cdi.kubevirt.io/storage.clone.cloneUniqeId"
    assert ann.CLONE_REQUEST == "k8s.io/CloneRequest"
