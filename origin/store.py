"""The origin's persistent object store: every render, kept for good
(docs/architecture.md#the-parts).

Two backends sit behind one blocking interface, `ObjectStore`; callers run it in an
executor. `open_store` picks one from a URL:

- ``file:///srv/nearvoice/objects`` or a plain path: `FilesystemStore`.
- ``s3://bucket/prefix?endpoint=http://127.0.0.1:8333&region=us-east-1``: `S3Store`.
  Credentials come from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  optionally ``AWS_SESSION_TOKEN``), or from boto3's own chain when those are unset; a URL
  that carries credentials is refused.

Every object carries its `ObjectMeta`. A `put` checks the body's length and SHA-256 against
the metadata before anything is written (`ValueError` on a mismatch), and a reader sees the
whole object or nothing. Reads check the body against its metadata as well: an object that
does not match is logged and answered as absent, never served, so the origin renders it
again and the next `put` repairs it.

Failures are `StoreError`, an `OSError`: `StoreFull` when the store is out of space or
quota, `StoreReadOnly` when it refuses writes. Keys are the lowercase hex SHA-256 spec keys;
anything else is a `ValueError`, so no key can name a path outside the store.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, unquote, urlsplit

from nearvoice.edge.cache.meta import ObjectMeta

log = logging.getLogger("nearvoice.origin.store")

KEY_PATTERN = re.compile(r"[0-9a-f]{64}")


class StoreError(OSError):
    """The store could not carry out an operation."""


class StoreFull(StoreError):
    """The store is out of space or quota (ENOSPC, EDQUOT, EFBIG; S3 507, EntityTooLarge)."""


class StoreReadOnly(StoreError):
    """The store refuses writes (EROFS, EACCES, EPERM; S3 AccessDenied on a write)."""


@runtime_checkable
class ObjectStore(Protocol):
    name: str
    """Which backend: "filesystem" or "s3"."""

    def put(self, meta: ObjectMeta, body: bytes) -> None:
        """Stores `body` under `meta.key`, atomically. `ValueError` when `body` does not
        match `meta` (length, SHA-256) or the key is malformed; nothing is written then."""
        ...

    def get(self, key: str) -> tuple[ObjectMeta, bytes] | None: ...

    def get_range(self, key: str, start: int, end: int) -> bytes | None:
        """Bytes ``[start, end)`` of the object, clipped to its length; None when absent."""
        ...

    def head(self, key: str) -> ObjectMeta | None: ...

    def delete(self, key: str) -> bool:
        """Removes the object; True when there was one."""
        ...

    def close(self) -> None:
        """Releases connections (S3); the store is not used afterwards."""
        ...


# -- shared checks -------------------------------------------------------------------------


def check_key(key: str) -> None:
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise ValueError(f"malformed object key {key!r}: expected 64 lowercase hex digits")


def verify_body(meta: ObjectMeta, body: bytes) -> None:
    """Raises ValueError unless `body` is exactly what `meta` describes."""
    check_key(meta.key)
    if len(body) != meta.length:
        raise ValueError(
            f"body of {meta.key} is {len(body)} bytes, its metadata says {meta.length}"
        )
    if hashlib.sha256(body).hexdigest() != meta.sha256:
        raise ValueError(f"body of {meta.key} does not match the SHA-256 in its metadata")


def _check_range(start: int, end: int) -> None:
    if start < 0 or end < start:
        raise ValueError(f"bad range [{start}, {end})")


def _parse_tag(tag: str, key: str, where: str) -> ObjectMeta | None:
    """The metadata in `tag`, or None (logged) when it is unreadable or names another key."""
    try:
        meta = ObjectMeta.from_tag(tag)
    except (ValueError, TypeError, KeyError) as exc:
        log.error("unreadable metadata for %s in %s: %s", key, where, exc)
        return None
    if meta.key != key:
        log.error("metadata for %s in %s names %s", key, where, meta.key)
        return None
    return meta


def _matches(meta: ObjectMeta, body: bytes, where: str) -> bool:
    if len(body) == meta.length and hashlib.sha256(body).hexdigest() == meta.sha256:
        return True
    log.error("object %s in %s does not match its metadata; not serving it", meta.key, where)
    return False


# -- filesystem ----------------------------------------------------------------------------

META_SUFFIX = ".meta.json"
TEMP_SUFFIX = ".tmp"
_SNAPSHOT_TRIES = 20
_READ_CHUNK = 1 << 20
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
_READ_ONLY_ERRNOS = frozenset({errno.EROFS, errno.EACCES, errno.EPERM})


def _fs_error(exc: OSError, action: str, *, write: bool) -> StoreError:
    code = exc.errno if exc.errno is not None else errno.EIO
    message = f"filesystem store: {action}: {exc.strerror or exc}"
    if write and code in _FULL_ERRNOS:
        return StoreFull(code, message, exc.filename)
    if write and code in _READ_ONLY_ERRNOS:
        return StoreReadOnly(code, message, exc.filename)
    return StoreError(code, message, exc.filename)


@contextlib.contextmanager
def _fs_errors(action: str, *, write: bool) -> Iterator[None]:
    """Turns the OSErrors of `action` into StoreErrors (a StoreError passes through)."""
    try:
        yield
    except StoreError:
        raise
    except OSError as exc:
        raise _fs_error(exc, action, write=write) from exc


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while size > 0:
        chunk = os.pread(fd, min(size, _READ_CHUNK), offset)
        if not chunk:
            break  # the file is shorter than it was a moment ago; the caller checks
        parts.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


class FilesystemStore:
    """Objects as plain files under `root`, two directory levels deep:

    ``root/ab/cd/<key>`` holds the body and ``root/ab/cd/<key>.meta.json`` its
    `ObjectMeta.to_tag()`. The metadata file is the commit: an object exists exactly when
    its metadata file does, and a body without one is never returned.

    A `put` writes the body and the metadata each to a temp file in the same directory
    (``.<key>.<random>.tmp``), fsyncs them, reads the body back to check its length and
    SHA-256, then publishes with `os.replace`: body first, then metadata, fsyncing the
    directory after each step. Why this order is crash-safe:

    - A crash before the body is renamed leaves only temp files, which no read looks at.
    - A crash between the two renames leaves a body with no metadata. For a new key that
      object simply does not exist yet. Publishing the metadata first instead would expose
      a commit whose body is missing, or still the old one.
    - When the key already holds an object with a *different* SHA-256, its metadata is
      unlinked (and the unlink made durable) before the new body is renamed in, so a crash
      can never pair the old metadata with the new body. Readers see the old object, then
      briefly none, then the new one. Renders are deterministic, so this only happens when
      a damaged object is repaired; a normal re-put carries the same bytes and never
      uncommits.
    - Each rename replaces a whole file, so the metadata on disk is always a complete old
      or complete new one.

    Reads take a snapshot: read the metadata, open the body, then read the metadata again.
    If it is unchanged, the open descriptor belongs to that commit (a different body can
    only be renamed in after that metadata was unlinked), so the bytes come from one whole
    version, whatever a writer does next. `get` checks the body's SHA-256 as well; `head`
    and `get_range` check its length. `get_range` reads with `os.pread`.

    Temp files and bodies without metadata are left behind only by crashes; `sweep`
    removes old ones.
    """

    name = "filesystem"

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"FilesystemStore({str(self.root)!r})"

    def close(self) -> None:
        """Nothing to release; present so both backends can be closed alike."""

    # -- paths -------------------------------------------------------------------------------
    def directory(self, key: str) -> Path:
        return self.root / key[:2] / key[2:4]

    def value_path(self, key: str) -> Path:
        return self.directory(key) / key

    def meta_path(self, key: str) -> Path:
        return self.directory(key) / (key + META_SUFFIX)

    # -- writes ------------------------------------------------------------------------------
    def put(self, meta: ObjectMeta, body: bytes) -> None:
        verify_body(meta, body)
        key = meta.key
        directory = self.directory(key)
        with _fs_errors(f"storing {key}", write=True):
            self._makedirs(directory)
            value_tmp = self._stage(directory, key, body, check=meta)
            try:
                meta_tmp = self._stage(directory, key, meta.to_tag().encode("ascii"))
                try:
                    self._publish(meta, directory, value_tmp, meta_tmp)
                finally:
                    meta_tmp.unlink(missing_ok=True)
            finally:
                value_tmp.unlink(missing_ok=True)

    def _publish(self, meta: ObjectMeta, directory: Path, value_tmp: Path, meta_tmp: Path) -> None:
        meta_path = self.meta_path(meta.key)
        previous = self._read_tag(meta_path)
        if previous is not None:
            old = _parse_tag(previous, meta.key, str(meta_path))
            if old is None or old.sha256 != meta.sha256:
                # Uncommit the old object before its body is replaced (see the class doc).
                meta_path.unlink(missing_ok=True)
                _fsync_dir(directory)
        os.replace(value_tmp, self.value_path(meta.key))
        _fsync_dir(directory)
        os.replace(meta_tmp, meta_path)
        _fsync_dir(directory)

    @staticmethod
    def _stage(directory: Path, key: str, data: bytes, check: ObjectMeta | None = None) -> Path:
        """Writes `data` to a new temp file in `directory` and fsyncs it. With `check`, reads
        it back and verifies length and SHA-256 before anyone may publish it."""
        path = directory / f".{key}.{uuid.uuid4().hex}{TEMP_SUFFIX}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
                if check is not None:
                    written = _pread_all(fd, os.fstat(fd).st_size, 0)
                    if len(written) != check.length or (
                        hashlib.sha256(written).hexdigest() != check.sha256
                    ):
                        raise StoreError(
                            errno.EIO, f"filesystem store: {key} read back differently", str(path)
                        )
            finally:
                os.close(fd)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    def _makedirs(self, directory: Path) -> None:
        """Creates the root and the two shard levels below it, fsyncing each new shard's
        parent so that a committed object's directories survive a crash too."""
        if not self.root.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
        for path in (directory.parent, directory):
            if not path.is_dir():
                with contextlib.suppress(FileExistsError):
                    path.mkdir()
                _fsync_dir(path.parent)

    def delete(self, key: str) -> bool:
        check_key(key)
        with _fs_errors(f"deleting {key}", write=True):
            try:
                self.meta_path(key).unlink()  # uncommit first
                existed = True
            except FileNotFoundError:
                existed = False
            try:
                self.value_path(key).unlink()
            except FileNotFoundError:
                if not existed:
                    return False
            _fsync_dir(self.directory(key))
        return existed

    def sweep(self, older_than: float = 3600.0) -> int:
        """Removes temp files and bodies without metadata that are older than `older_than`
        seconds: what crashes leave behind. Returns how many files it removed."""
        cutoff = time.time() - older_than
        removed = 0
        with _fs_errors("sweeping", write=True):
            for path in self._shard_files():
                name = path.name
                orphan_temp = name.startswith(".") and name.endswith(TEMP_SUFFIX)
                orphan_value = (
                    KEY_PATTERN.fullmatch(name) is not None
                    and not (path.parent / (name + META_SUFFIX)).exists()
                )
                if not (orphan_temp or orphan_value):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < cutoff:
                        path.unlink()
                        removed += 1
        return removed

    def _shard_files(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for first in self.root.iterdir():
            if not (len(first.name) == 2 and first.is_dir()):
                continue
            for second in first.iterdir():
                if len(second.name) == 2 and second.is_dir():
                    yield from second.iterdir()

    # -- reads -------------------------------------------------------------------------------
    def get(self, key: str) -> tuple[ObjectMeta, bytes] | None:
        check_key(key)
        with _fs_errors(f"reading {key}", write=False), self._snapshot(key) as found:
            if found is None:
                return None
            meta, fd = found
            body = _pread_all(fd, meta.length, 0)
        if not _matches(meta, body, str(self.value_path(key))):
            return None
        return meta, body

    def get_range(self, key: str, start: int, end: int) -> bytes | None:
        check_key(key)
        _check_range(start, end)
        with _fs_errors(f"reading {key}", write=False), self._snapshot(key) as found:
            if found is None:
                return None
            meta, fd = found
            start = min(start, meta.length)
            end = min(end, meta.length)
            data = _pread_all(fd, end - start, start)
        if len(data) != end - start:
            log.error("object %s shrank while being read; not serving it", key)
            return None
        return data

    def head(self, key: str) -> ObjectMeta | None:
        check_key(key)
        with _fs_errors(f"reading {key}", write=False), self._snapshot(key) as found:
            return None if found is None else found[0]

    @contextlib.contextmanager
    def _snapshot(self, key: str) -> Iterator[tuple[ObjectMeta, int] | None]:
        """The committed metadata of `key` and a descriptor on the body of that same commit,
        or None when there is no (intact) object."""
        meta_path = self.meta_path(key)
        value_path = self.value_path(key)
        for _ in range(_SNAPSHOT_TRIES):
            before = self._read_tag(meta_path)
            if before is None:
                yield None
                return
            try:
                fd = os.open(value_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                fd = -1
            try:
                after = self._read_tag(meta_path)
                if after != before:
                    continue  # a writer or a delete got in between; look again
                meta = _parse_tag(before, key, str(meta_path))
                if meta is None:
                    yield None
                    return
                if fd < 0:
                    log.error("object %s is committed but its body is missing", key)
                    yield None
                    return
                size = os.fstat(fd).st_size
                if size != meta.length:
                    log.error("object %s is %d bytes, its metadata says %d", key, size, meta.length)
                    yield None
                    return
                yield meta, fd
                return
            finally:
                if fd >= 0:
                    os.close(fd)
        raise StoreError(errno.EAGAIN, f"filesystem store: {key} kept changing while being read")

    @staticmethod
    def _read_tag(path: Path) -> str | None:
        try:
            return path.read_text(encoding="ascii")
        except FileNotFoundError:
            return None
        except UnicodeDecodeError:
            return ""  # not a tag; `_parse_tag` reports it


# -- S3 --------------------------------------------------------------------------------------

S3_META_FIELD = "nearvoice"
"""User-metadata name of the tag; it travels as the header ``x-amz-meta-nearvoice``."""
S3_USER_META_LIMIT = 2048
"""S3 limits user metadata to 2 KB: the UTF-8 bytes of every name and value, summed."""
_S3_MISSING = frozenset({"NoSuchKey", "NoSuchBucket", "NotFound", "404"})
_S3_FULL = frozenset(
    {
        "EntityTooLarge",
        "InsufficientStorage",
        "QuotaExceeded",
        "StorageFull",
        "XMinioStorageFull",
        "ServiceQuotaExceeded",
    }
)
_S3_AUTH = frozenset(
    {"SignatureDoesNotMatch", "InvalidAccessKeyId", "ExpiredToken", "InvalidToken"}
)


def _s3_status(exc: Any) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _s3_code(exc: Any) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _s3_missing(exc: Any) -> bool:
    return _s3_code(exc) in _S3_MISSING or _s3_status(exc) == 404


class S3Store:
    """Objects in an S3 bucket (AWS, SeaweedFS, MinIO, ...) under ``<prefix>/<key>``.

    The metadata travels with the object as user metadata (``x-amz-meta-nearvoice``, the
    JSON tag) and the Content-Type header, so one GET returns both, consistently. A PUT
    replaces the whole object atomically; it carries ``x-amz-checksum-sha256`` so the server
    rejects a body damaged on the way (BadDigest). `get_range` sends
    ``Range: bytes=start-(end-1)``. The bucket is created on the first `put` if it is
    missing.
    """

    name = "s3"

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        region: str = "us-east-1",
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        session_token: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 30.0,
        max_attempts: int = 3,
    ) -> None:
        try:
            import boto3
            from botocore.config import Config
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise StoreError(
                errno.ENOSYS, "the s3 store needs boto3: install nearvoice[s3]"
            ) from exc
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        config = Config(
            region_name=region,
            s3={"addressing_style": "path"},
            retries={"max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # Checksums only where we ask for one (the SHA-256 on PUT): S3-compatible
            # stores differ in which of the newer default checksums they understand.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            user_agent_extra="nearvoice-origin",
        )
        credentials: dict[str, str] = {}
        if access_key and secret_key:
            credentials = {"aws_access_key_id": access_key, "aws_secret_access_key": secret_key}
            if session_token:
                credentials["aws_session_token"] = session_token
        # A session per store: boto3's default session is shared and not thread-safe,
        # while the client made here is.
        session = boto3.session.Session()
        self._client: Any = session.client(
            "s3", endpoint_url=endpoint_url, config=config, **credentials
        )
        self._bucket_ready = False
        self._bucket_lock = threading.Lock()

    def __repr__(self) -> str:
        where = f"bucket={self.bucket!r}, prefix={self.prefix!r}, endpoint={self.endpoint_url!r}"
        return f"S3Store({where})"

    def close(self) -> None:
        self._client.close()

    def object_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    # -- errors ------------------------------------------------------------------------------
    def _error(self, exc: Exception, action: str, *, write: bool) -> StoreError:
        from botocore.exceptions import ClientError

        where = f"s3 store s3://{self.bucket}/{self.prefix}: {action}"
        if not isinstance(exc, ClientError):
            return StoreError(errno.EIO, f"{where}: {exc}")
        code = _s3_code(exc)
        status = _s3_status(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        text = f"{where}: {code or status} {message}".rstrip()
        if code in _S3_FULL or status == 507:
            return StoreFull(errno.ENOSPC, text)
        if code in _S3_AUTH:
            return StoreError(errno.EACCES, text)
        if write and (code == "AccessDenied" or status == 403):
            return StoreReadOnly(errno.EROFS, text)
        return StoreError(errno.EIO, text)

    def _call(self, action: str, method: str, *, write: bool, **params: Any) -> Any:
        """Calls the client; None when the object (or bucket) does not exist."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self._client, method)(Bucket=self.bucket, **params)
        except ClientError as exc:
            if _s3_code(exc) == "NoSuchBucket":
                self._bucket_ready = False  # deleted under us: the next put creates it again
            if _s3_missing(exc) and method != "put_object":
                return None
            raise self._error(exc, action, write=write) from exc
        except BotoCoreError as exc:
            raise self._error(exc, action, write=write) from exc

    def _meta_from(self, response: dict[str, Any], key: str) -> ObjectMeta | None:
        tag = response.get("Metadata", {}).get(S3_META_FIELD)
        if tag is None:
            log.warning("s3 object %s has no nearvoice metadata; ignoring it", key)
            return None
        return _parse_tag(str(tag), key, f"s3://{self.bucket}/{self.object_key(key)}")

    def _read_body(self, response: dict[str, Any], action: str) -> bytes:
        from botocore.exceptions import BotoCoreError

        stream = response["Body"]
        try:
            return bytes(stream.read())
        except BotoCoreError as exc:
            raise self._error(exc, action, write=False) from exc
        finally:
            stream.close()

    # -- writes ------------------------------------------------------------------------------
    def put(self, meta: ObjectMeta, body: bytes) -> None:
        verify_body(meta, body)
        tag = meta.to_tag()
        size = len(S3_META_FIELD) + len(tag.encode("utf-8"))
        if not tag.isascii() or size > S3_USER_META_LIMIT:
            raise ValueError(
                f"metadata of {meta.key} is {size} bytes of user metadata; S3 allows "
                f"{S3_USER_META_LIMIT} (ASCII)"
            )
        if not (meta.content_type.isascii() and meta.content_type.isprintable()):
            raise ValueError(f"content type {meta.content_type!r} is not a header value")
        self._ensure_bucket()
        checksum = base64.b64encode(bytes.fromhex(meta.sha256)).decode("ascii")
        self._call(
            f"storing {meta.key}",
            "put_object",
            write=True,
            Key=self.object_key(meta.key),
            Body=body,
            ContentLength=len(body),
            ContentType=meta.content_type,
            Metadata={S3_META_FIELD: tag},
            ChecksumSHA256=checksum,
        )

    def _ensure_bucket(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        with self._bucket_lock:
            if self._bucket_ready:
                return
            action = f"creating bucket {self.bucket}"
            try:
                self._client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if _s3_missing(exc):
                    self._create_bucket()
                elif _s3_status(exc) != 403:
                    # 403: we may not look at the bucket but may still write objects.
                    raise self._error(exc, action, write=True) from exc
            except BotoCoreError as exc:
                raise self._error(exc, action, write=True) from exc
            self._bucket_ready = True

    def _create_bucket(self) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        params: dict[str, Any] = {"Bucket": self.bucket}
        if self.region != "us-east-1":
            params["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**params)
            log.info("created bucket %s", self.bucket)
        except ClientError as exc:
            if _s3_code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._error(exc, f"creating bucket {self.bucket}", write=True) from exc
        except BotoCoreError as exc:
            raise self._error(exc, f"creating bucket {self.bucket}", write=True) from exc

    def delete(self, key: str) -> bool:
        check_key(key)
        action = f"deleting {key}"
        # DELETE answers 204 whether or not the object was there; HEAD tells us.
        existed = self._call(action, "head_object", write=False, Key=self.object_key(key))
        if existed is None:
            return False
        self._call(action, "delete_object", write=True, Key=self.object_key(key))
        return True

    # -- reads -------------------------------------------------------------------------------
    def get(self, key: str) -> tuple[ObjectMeta, bytes] | None:
        check_key(key)
        action = f"reading {key}"
        response = self._call(action, "get_object", write=False, Key=self.object_key(key))
        if response is None:
            return None
        meta = self._meta_from(response, key)
        body = self._read_body(response, action)
        if meta is None or not _matches(meta, body, f"s3://{self.bucket}"):
            return None
        return meta, body

    def get_range(self, key: str, start: int, end: int) -> bytes | None:
        check_key(key)
        _check_range(start, end)
        if start == end:
            return None if self.head(key) is None else b""
        from botocore.exceptions import BotoCoreError, ClientError

        action = f"reading {key} [{start}, {end})"
        try:
            response = self._client.get_object(
                Bucket=self.bucket, Key=self.object_key(key), Range=f"bytes={start}-{end - 1}"
            )
        except ClientError as exc:
            if _s3_code(exc) == "InvalidRange" or _s3_status(exc) == 416:
                # The range starts at or after the end: clipped, it is empty.
                return None if self.head(key) is None else b""
            if _s3_missing(exc):
                return None
            raise self._error(exc, action, write=False) from exc
        except BotoCoreError as exc:
            raise self._error(exc, action, write=False) from exc
        meta = self._meta_from(response, key)
        data = self._read_body(response, action)
        if meta is None:
            return None
        if response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200:
            data = data[start:end]  # the server ignored the Range header
        expected = max(0, min(end, meta.length) - start)
        if len(data) != expected:
            log.error("s3 object %s answered %d bytes for [%d, %d)", key, len(data), start, end)
            return None
        return data

    def head(self, key: str) -> ObjectMeta | None:
        check_key(key)
        response = self._call(
            f"reading {key}", "head_object", write=False, Key=self.object_key(key)
        )
        if response is None:
            return None
        meta = self._meta_from(response, key)
        if meta is not None and response.get("ContentLength") != meta.length:
            log.error("s3 object %s has the wrong length; not serving it", key)
            return None
        return meta


# -- opening -----------------------------------------------------------------------------

_BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]")
_S3_PARAMS = frozenset({"endpoint", "region"})
_SECRET_WORDS = ("key", "secret", "token", "password", "credential", "signature")
CREDENTIALS_FROM_ENV = (
    "S3 credentials come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), "
    "never from the store URL"
)


def open_store(url: str) -> ObjectStore:
    """Opens the store that `url` names; see the module doc. Raises ValueError for a URL
    it cannot use. Nothing is contacted until the first operation."""
    if not url:
        raise ValueError("empty store URL")
    if "://" not in url:
        return FilesystemStore(Path(url))
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError("file store URLs name a local path: file:///path")
        if parts.query or parts.fragment:
            raise ValueError("file store URLs take no query or fragment")
        path = unquote(parts.path)
        if not path:
            raise ValueError("file store URL has no path")
        return FilesystemStore(Path(path))
    if scheme == "s3":
        return _open_s3(parts.netloc, parts.path, parts.query, parts.fragment)
    raise ValueError(f"unsupported store URL scheme {parts.scheme!r}: use file:// or s3://")


def _open_s3(netloc: str, path: str, query: str, fragment: str) -> S3Store:
    if "@" in netloc:
        raise ValueError(CREDENTIALS_FROM_ENV)
    bucket = netloc
    if not _BUCKET_PATTERN.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"bad S3 bucket name {bucket!r}")
    if fragment:
        raise ValueError("S3 store URLs take no fragment")
    prefix = unquote(path).strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ValueError(f"bad S3 key prefix {prefix!r}")
    params: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        lowered = name.lower()
        if any(word in lowered for word in _SECRET_WORDS):
            raise ValueError(CREDENTIALS_FROM_ENV)
        if lowered not in _S3_PARAMS:
            raise ValueError(f"unknown S3 store parameter {name!r}: use endpoint, region")
        if lowered in params:
            raise ValueError(f"S3 store parameter {name!r} given twice")
        params[lowered] = value
    endpoint = params.get("endpoint") or None
    if endpoint is not None:
        target = urlsplit(endpoint)
        if target.scheme not in ("http", "https") or not target.hostname:
            raise ValueError(f"bad S3 endpoint {endpoint!r}: expected http(s)://host[:port]")
        if "@" in target.netloc:
            raise ValueError(CREDENTIALS_FROM_ENV)
    region = (
        params.get("region")
        or os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or "us-east-1"
    )
    return S3Store(
        bucket,
        prefix,
        endpoint_url=endpoint,
        region=region,
        access_key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret_key=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        session_token=os.environ.get("AWS_SESSION_TOKEN"),
    )
