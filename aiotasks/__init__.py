"""aiotasks: an asyncio-native task runner on Redis Streams."""

import logging

from .app import App
from .canvas import chain, chord, group
from .config import InvalidRedisURL
from .context import TaskContext, current_task
from .errors import (
    AiotasksError,
    BrokerConnectionError,
    BrokerRefusedError,
    ChordError,
    ConfigurationError,
    MaxRetriesExceededError,
    Replace,
    ResultTimeout,
    Retry,
    SerializationError,
    SignatureError,
    SoftTimeLimitExceeded,
    TaskFailed,
    TaskLost,
    TaskRevoked,
    TimeLimitExceeded,
    UnknownTask,
)
from .handle import GroupHandle, TaskHandle
from .state import TaskInfo, TaskState
from .task import Signature, Task
from .usertypes import register_type
from .worker import Worker

__version__ = "0.2.0"

__all__ = [
    "AiotasksError",
    "App",
    "BrokerConnectionError",
    "BrokerRefusedError",
    "ChordError",
    "ConfigurationError",
    "GroupHandle",
    "InvalidRedisURL",
    "MaxRetriesExceededError",
    "Replace",
    "ResultTimeout",
    "Retry",
    "SerializationError",
    "Signature",
    "SignatureError",
    "SoftTimeLimitExceeded",
    "Task",
    "TaskContext",
    "TaskFailed",
    "TaskHandle",
    "TaskInfo",
    "TaskLost",
    "TaskRevoked",
    "TaskState",
    "TimeLimitExceeded",
    "UnknownTask",
    "Worker",
    "__version__",
    "chain",
    "chord",
    "current_task",
    "group",
    "register_type",
]

logging.getLogger("aiotasks").addHandler(logging.NullHandler())
