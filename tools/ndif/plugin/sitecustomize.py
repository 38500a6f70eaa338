"""Loaded by every process of the local NDIF (this folder is on its PYTHONPATH): imports anyio's asyncio backend and
thread pool before anything imports nnsight.

Why: nnsight mounts a `save` attribute on every object. anyio imports some of its own modules lazily, and a class
defined after that mount (anyio.abc's SocketAttribute, a TypedAttributeSet) fails with "Attribute 'save' is missing
its type annotation". In the NDIF API that happens the first time a request body exceeds starlette's 1 MiB in-memory
spool and the upload is written to disk through anyio's thread pool: every request over 1 MiB (e.g. one that carries
an SAE's weights) was refused with "There was an error parsing the body". Importing them first defines the classes
before the mount.
"""
import anyio._backends._asyncio  # noqa: F401
import anyio.to_thread  # noqa: F401
