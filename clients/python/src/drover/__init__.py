"""drover for Python producers.

* :class:`Client`: ``publish``, ``publish_many``, ``enqueue`` (inside your own psycopg
  transaction), ``job``, ``wait``.
* :mod:`drover.exec`: ``serve(fn)``, the child side of the ``exec`` pipeline.

See ``docs/producers.md`` in the drover repository.
"""

from .client import Client, Job, JobInfo, Outcome, enqueue
from .errors import Conflict, DroverError, InvalidJob, Transient, WaitTimeout
from .schema import validate_message

__all__ = [
    "Client",
    "Conflict",
    "DroverError",
    "InvalidJob",
    "Job",
    "JobInfo",
    "Outcome",
    "Transient",
    "WaitTimeout",
    "enqueue",
    "validate_message",
]
