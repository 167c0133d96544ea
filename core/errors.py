"""The project's exceptions. Every message names the object and says what to do next."""


class NovaDRError(Exception):
    """Base class: an error whose message is meant for the operator as it is."""


class InventoryError(NovaDRError):
    """The cluster inventory is invalid or cannot be loaded."""


class ConnectError(NovaDRError):
    """A master cannot be reached or authenticated over SSH."""


class AuthError(ConnectError):
    """The master answered but refused us (a changed or unknown host key, a refused login):
    not transient, never retried."""


class BecomeError(AuthError):
    """sudo refused to run a command (wrong password, no sudo rule): never retried (a retried
    wrong password can lock the account)."""


class ConnectionLost(ConnectError):
    """An established SSH connection dropped while a command ran: transient, retryable."""


class CommandError(NovaDRError):
    """A remote command exited non-zero where success was required."""

    def __init__(self, node: str, argv: list[str], code: int, stdout: str, stderr: str):
        self.node, self.argv, self.code = node, argv, code
        self.stdout, self.stderr = stdout, stderr
        lines = (stderr or stdout).strip().splitlines()
        # A Go program's panic or error line explains more than the stack trace after it.
        key = [x for x in lines if x.startswith(("Error:", "panic:", "fatal error:"))]
        tail = (key or lines)[-5:]
        # A shell script says nothing in a one-line message: its arguments do.
        shown = [a if "\n" not in a else "<script>" for a in argv]
        super().__init__(
            f"on {node}: `{' '.join(shown[:5])}{' ...' if len(shown) > 5 else ''}` exited {code}: "
            + (" | ".join(tail) or "(no output)")
        )

    def __reduce__(self):
        # Prefect stores a failed step's exception and reads it back: the default rebuilds it
        # from the message alone, which this __init__ does not take (a TypeError on resume).
        return (type(self), (self.node, self.argv, self.code, self.stdout, self.stderr))


class SnapshotError(NovaDRError):
    """A snapshot failed a check; nothing has been changed."""


class PreflightError(NovaDRError):
    """The cluster's state does not allow the requested procedure; nothing has been changed."""


class NotApproved(NovaDRError):
    """The plan was rejected or the approval timed out; nothing destructive ran."""


class PlanChanged(NovaDRError):
    """The cluster changed between the approved plan and execution."""


class ClusterBusy(NovaDRError):
    """Another recovery holds this cluster."""


class LockLost(ClusterBusy):
    """This run's hold on the cluster was taken over or could not be renewed: it stops."""


class UnsafeArchive(NovaDRError):
    """An archive member would land outside the extraction directory, or the archive unpacks
    to more than any backup holds."""
