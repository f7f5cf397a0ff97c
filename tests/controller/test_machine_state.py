"""One classification of Fly machine states, shared by the plan, the executor, the client and the emulator."""

from __future__ import annotations

from controller import machine_state as ms
from controller.machine_state import MachineState


def test_every_state_is_classified_exactly_once() -> None:
    assert ms.RESTING | ms.TRANSIENT | ms.GONE == frozenset(MachineState)
    assert not (ms.RESTING & ms.TRANSIENT) and not (ms.GONE & (ms.RESTING | ms.TRANSIENT))


def test_replaced_and_migrated_are_transitions_of_a_living_machine_not_gone() -> None:
    for state in (MachineState.REPLACED, MachineState.MIGRATED):
        assert state in ms.TRANSIENT and state not in ms.GONE


def test_plain_destroy_is_only_for_machines_at_rest() -> None:
    assert ms.AT_REST == {"stopped", "suspended", "failed", "created"}
    assert ms.AT_REST <= ms.RESTING


def test_unknown_states_parse_to_none_and_are_in_no_class() -> None:
    assert MachineState.parse("hibernating") is None
    assert MachineState.parse("started") is MachineState.STARTED
    assert "hibernating" not in ms.KNOWN


def test_wire_strings_compare_equal_to_members() -> None:
    assert "suspended" in ms.SETTLED and MachineState.STARTED == "started"
