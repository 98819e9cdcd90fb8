"""A job's life: create (resume / error / replace when the name exists), reuse with other
variables (refused, naming the difference), delete from the client and from ``adamax-ps delete``
(scoped tokens apply)."""

from __future__ import annotations

import numpy as np
import pytest

from _ps_helpers import running_server
from adamax_client import AlreadyExistsError, FailedPreconditionError, NotFoundError, RemoteAdamax
from adamax_client.errors import PermissionDeniedError
from adamax_server.cli import commands as cli
from adamax_server.errors import NotFound
from adamax_server.transport.security import TokenTable

VARIABLES = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}


def _trained(target: str, key: str = "job", **kwargs) -> RemoteAdamax:
    opt = RemoteAdamax(target, optimizer=key, bulk="off", **kwargs)
    opt.build(VARIABLES)
    opt.push({"w": np.full((3, 2), 0.5, np.float32), "b": np.ones(2, np.float32)})
    return opt


def test_an_existing_name_resumes_by_default_and_error_or_replace_on_request():
    with running_server() as (target, coordinator):
        with _trained(target):
            with RemoteAdamax(target, optimizer="job", bulk="off") as again:  # resume (default)
                assert again.created is False
                assert again.build(VARIABLES) is False  # attached; the trained weights stay
                assert again.iterations == 1
                assert not np.array_equal(again.pull()["w"], VARIABLES["w"])

            with pytest.raises(AlreadyExistsError, match="if_exists='resume'.*'replace'"):
                RemoteAdamax(target, optimizer="job", bulk="off", if_exists="error")
            assert coordinator.get("job").iterations == 1  # untouched by the refusal

            with RemoteAdamax(target, optimizer="job", bulk="off", if_exists="replace") as fresh:
                assert fresh.created is True
                assert fresh.iterations == 0 and not fresh.built
                assert fresh.build(VARIABLES) is True
            with pytest.raises(ValueError, match="if_exists"):
                RemoteAdamax(target, optimizer="job", bulk="off", if_exists="overwrite")


def test_a_reused_name_with_other_variable_shapes_is_an_error_naming_the_difference():
    with running_server() as (target, _):
        with _trained(target):
            with RemoteAdamax(target, optimizer="job", bulk="off") as other:
                with pytest.raises(FailedPreconditionError, match=r"variable 'w' is \[3, 2\]:float32 in the job, \[3, 5\]:float32 here"):
                    other.build({"w": np.ones((3, 5), np.float32), "b": np.zeros(2, np.float32)})
                with pytest.raises(FailedPreconditionError, match="no variable 'x' in the existing job"):
                    other.build({"x": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)})


def test_delete_from_the_client_and_from_the_cli(capsys):
    with running_server() as (target, coordinator):
        opt = _trained(target)
        assert opt.delete() is True
        assert opt.delete() is False
        with pytest.raises(NotFound):
            coordinator.get("job")
        with pytest.raises(NotFoundError):
            opt.pull()
        opt.close()

        _trained(target, "cli-job").close()
        assert cli.main(["delete", "cli-job", "--target", target]) == 0
        assert "deleted cli-job" in capsys.readouterr().out
        assert cli.main(["delete", "cli-job", "--target", target]) == 1
        assert "no optimizer named 'cli-job'" in capsys.readouterr().err


def test_deleting_needs_a_token_allowed_to_touch_the_job(monkeypatch, capsys):
    tokens = TokenTable.from_tokens({"admin-token": [], "a-token": ["a"]})
    with running_server(tokens=tokens) as (target, coordinator):
        for key in ("a", "b"):
            _trained(target, key, token="admin-token").close()
        monkeypatch.setenv("ADAMAX_PS_TOKEN", "a-token")  # the CLI's token, as for `status`
        assert cli.main(["delete", "b", "--target", target]) == 1
        assert "limited to" in capsys.readouterr().err
        monkeypatch.setenv("ADAMAX_PS_TOKEN", "wrong")
        assert cli.main(["delete", "b", "--target", target]) == 1
        assert coordinator.get("b").iterations == 1  # still there
        monkeypatch.setenv("ADAMAX_PS_TOKEN", "a-token")
        assert cli.main(["delete", "a", "--target", target]) == 0

        with RemoteAdamax(target, optimizer="a", token="a-token", bulk="off") as mine:
            mine.key = "b"  # the same client, aimed at a job its token does not cover
            with pytest.raises(PermissionDeniedError, match="limited to"):
                mine.delete()
        assert coordinator.get("b").iterations == 1
