"""Only the warnings a user can act on reach the training log."""
import logging

from components.controlnet_train.quiet import silence_orbax_reregistration


def test_orbax_re_registration_notice_is_dropped_and_other_absl_warnings_stay(caplog):
    silence_orbax_reregistration()
    absl = logging.getLogger("absl")
    with caplog.at_level(logging.WARNING):
        absl.warning('Type handler registry type "<class \'jax.jaxlib._jax.Array\'>" overriding jax.Array')
        absl.warning("checkpoint directory is not writable")
    assert [r.getMessage() for r in caplog.records] == ["checkpoint directory is not writable"]
