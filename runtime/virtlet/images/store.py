"""The content-addressed image store: ``data/<sha256 hex>`` files plus a name index in ``images.db``.

Layout of ``image_dir``::

    images.db        SQLite (WAL): images(digest, size, format, virtual_size, pulled_at),
                     names(name -> digest)
    data/<hex>       image content, named by its sha256 (a registry image: by the id ``containerdisk.image_id``
                     derives from its verified layer digest); never modified after the rename that creates it
    tmp/<rand>.part  downloads in progress (same filesystem, so the final rename is atomic)

Crash safety: a download is written to ``tmp/``, fsynced, hashed, validated, renamed into ``data/`` (and
the directory fsynced), and only then indexed.  A crash at any point leaves files that ``cleanup_at_start``
removes (tmp files, data without an index row); the index never names a missing file.  After any failed pull
the store is as it was: the tmp file is deleted in ``finally`` and no row is written.

The store is self-contained (own DB, no knowledge of containers): ``in_use`` is the caller's callback that
returns the digests used by containers; data of such digests is never removed.  ``in_use`` must not call back
into the store.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future
from pathlib import Path
from urllib.parse import urlsplit

from virtlet import errors, failpoints
from virtlet.images import containerdisk, names, validate
from virtlet.images import registry as reg
from virtlet.images.fetch import Fetcher, FetchInfo, HttpFetcher
from virtlet.images.policy import SourcePolicy
from virtlet.images.progress import ProgressLog
from virtlet.images.records import FsInfo as FsInfo  # re-exported: callers import them from the store
from virtlet.images.records import ImageRecord as ImageRecord
from virtlet.images.records import db_error, fsync_dir, remove_path
from virtlet.images.registry import Credentials
from virtlet.images.registry_config import RegistryConfig
from virtlet.images.sink import HashingFileSink, disk
from virtlet.images.translate import Source, Translator

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    digest TEXT PRIMARY KEY, size INTEGER NOT NULL, format TEXT NOT NULL,
    virtual_size INTEGER NOT NULL, pulled_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY, digest TEXT NOT NULL REFERENCES images(digest));
CREATE INDEX IF NOT EXISTS names_by_digest ON names(digest);
"""


class ImageStore:
    """Thread-safe.  ``pull`` blocks; concurrent pulls of the same source and pin share one download."""

    def __init__(self, image_dir: Path, translations_dir: Path, default_scheme: str = "https",
                 in_use: Callable[[], set[str]] = lambda: set(),
                 fetchers: Mapping[str, Fetcher] | None = None, progress_interval: float = 5.0,
                 policy: SourcePolicy | None = None, registries: RegistryConfig | None = None) -> None:
        self.image_dir = Path(image_dir)
        self.data_dir = self.image_dir / "data"
        self.tmp_dir = self.image_dir / "tmp"
        self.in_use = in_use
        self.progress_interval = progress_interval
        self.policy = policy or SourcePolicy()
        self.registries = registries or RegistryConfig(None)
        http = HttpFetcher(self.policy)
        self.fetchers: dict[str, Fetcher] = dict(fetchers) if fetchers is not None else {"http": http,
                                                                                          "https": http}
        self.translator = Translator(Path(translations_dir), default_scheme, schemes=(*self.fetchers, "oci"),
                                     fallback=self.policy.name_fallback)
        for d in (self.image_dir, self.data_dir, self.tmp_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._inflight: dict[Hashable, Future[str]] = {}
        self._db = sqlite3.connect(self.image_dir / "images.db", check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- queries --------------------------------------------------------------------------------------------

    def status(self, name_or_ref: str) -> ImageRecord | None:
        """By name (tag ignored), ``name@sha256:<hex>`` or ``sha256:<hex>``/``<hex>`` (the digest decides)."""
        digest = self._resolve(name_or_ref)
        return self._record(digest) if digest else None

    def list(self, name: str | None = None, digest: str | None = None) -> list[ImageRecord]:
        """All images, or those matching ``name`` (any ref form) and/or ``digest``."""
        with self._lock:
            digests = [r[0] for r in self._db.execute("SELECT digest FROM images ORDER BY pulled_at, digest")]
        if name:
            wanted = self._resolve(name)
            digests = [d for d in digests if d == wanted]
        if digest:
            wanted = names.digest_of(digest) or self._resolve(digest)
            digests = [d for d in digests if d == wanted]
        return [r for r in map(self._record, digests) if r is not None]

    def ref(self, record: ImageRecord, name: str) -> str:
        """``<name>@sha256:<hex>``: the image ref PullImage returns."""
        return f"{names.parse(name).name}@{record.digest}"

    def fs_info(self) -> FsInfo:
        used = inodes = 0
        for root, dirs, files in os.walk(self.image_dir):
            for entry in (*dirs, *files):
                try:
                    st = os.lstat(os.path.join(root, entry))
                except FileNotFoundError:
                    continue
                used += st.st_blocks * 512
                inodes += 1
        mount = os.path.realpath(self.image_dir)
        while not os.path.ismount(mount):
            mount = os.path.dirname(mount)
        return FsInfo(mount, used, inodes, time.time_ns())

    # -- pull -----------------------------------------------------------------------------------------------

    def pull(self, name: str, credentials: Credentials | None = None, registry: bool = False) -> ImageRecord:
        """Download (or reuse, when pinned and present) the image and index ``name`` -> its digest.

        ``registry``: ``name`` is a plain registry reference (no translation); a translation to an ``oci://``
        URL also pulls from a registry.  ``credentials`` (CRI AuthConfig) are used for registry pulls only."""
        if registry:
            ref = reg.parse_reference(name.strip(), f"image {name[:200]!r}")
            return self._pull_registry(ref, credentials, trusted=False)
        parsed = names.parse(name)
        digest = parsed.digest
        source = self.translator.resolve(parsed.name)  # also when pinned: image_name_fallback applies
        if urlsplit(source.url).scheme == "oci":
            ref = reg.parse_reference(source.url.removeprefix("oci://"), f"image {parsed.name!r} ({source.origin})")
            return self._pull_registry(ref, credentials, source.trusted, source.transport.timeout, parsed.name)
        if digest is None or self._record(digest) is None:
            digest = self._shared_download((source.url, source.trusted, source.transport, parsed.digest),
                                           source.name, source.url, lambda sink: self._fetch(source, sink),
                                           parsed.digest, source.origin)
        return self._named(parsed.name, digest, name)

    def _named(self, name: str, digest: str, asked: str, *more: str) -> ImageRecord:
        failpoints.hit("image.pull.after_commit")
        for n in (name, *more):
            self._name(n, digest)
        record = self._record(digest)
        if record is None:
            raise errors.Unavailable(f"image {asked!r} was removed while it was being pulled; pull it again")
        return record

    def _fetch(self, source: Source, sink: HashingFileSink) -> FetchInfo:
        return self.fetchers[urlsplit(source.url).scheme].fetch(source, sink)

    def _pull_registry(self, ref: reg.Reference, creds: Credentials | None, trusted: bool,
                       timeout: float = 60.0, *also: str) -> ImageRecord:
        """A containerDisk from a registry: the manifest is always asked for (a tag may move); the blobs only
        when no stored image has that manifest digest already.  ``also``: the translated name the pod used."""
        if ref.digest and (stored := self._resolve_name(f"{ref.name}@{ref.digest}")):
            return self._named(f"{ref.name}@{ref.digest}", stored, str(ref), *also)  # pinned, present: no network
        client, manifest = containerdisk.resolve_hosts(ref, creds, self.registries.lookup, self.policy, trusted,
                                                       timeout, self.policy.max_size)
        by_digest = f"{ref.name}@{manifest.digest}"
        digest = self._resolve_name(by_digest) or self._resolve_name(f"{ref.name}@{manifest.image_digest}")
        if digest is None:
            key = ("oci", by_digest, trusted, client.creds.key() if client.creds else "")
            digest = self._shared_download(
                key, str(ref), f"{client.base}/v2/{ref.repo}",
                lambda sink: containerdisk.fetch_disk(client, manifest, sink, self.policy.max_size),
                None, "registry", hash_image=False)
        tags = (f"{ref.name}:{ref.tag}",) if ref.tag else ()
        return self._named(by_digest, digest, str(ref), *tags, *also)

    def _shared_download(self, key: Hashable, name: str, url: str, fetch: Callable[[HashingFileSink], FetchInfo],
                         pin: str | None, origin: str, hash_image: bool = True) -> str:
        # Only identical requests share a download: an untrusted pull of a URL must not ride on a trusted
        # (unchecked) download of the same URL, nor on another transport's or another user's credentials.
        with self._lock:
            fut = self._inflight.get(key)
            leader = fut is None
            if fut is None:
                fut = self._inflight[key] = Future()
        if not leader:
            log.info("pull of %s joins the download of %s in progress", name, url)
            return fut.result()
        try:
            digest = self._download(name, url, fetch, pin, origin, hash_image)
            fut.set_result(digest)
            return digest
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                del self._inflight[key]

    def _download(self, name: str, url: str, fetch: Callable[[HashingFileSink], FetchInfo], pin: str | None,
                  origin: str, hash_image: bool = True) -> str:
        """``hash_image=False``: the fetcher returns the id (``FetchInfo.digest``), the file is not hashed."""
        what = f"image {name!r} from {url}"
        progress = ProgressLog(f"pull {name} from {url}", self.progress_interval)
        log.info("pulling %s (%s)", what, origin)
        fd, tmp = disk(lambda: tempfile.mkstemp(dir=self.tmp_dir, suffix=".part"), what)
        try:
            sink = HashingFileSink(fd, progress, what, hash_image)
            try:
                info = fetch(sink)
                content = sink.finish()
                digest = f"sha256:{content}" if hash_image else info.digest
                if not digest.startswith("sha256:") or len(digest) != 71:
                    raise errors.Internal(f"{what}: the fetcher gave no image id")
            except BaseException:
                sink.abort()
                raise
            finally:
                os.close(fd)
            progress.finish()
            failpoints.hit("image.pull.after_download")
            if pin and pin != digest:
                raise errors.FailedPrecondition(
                    f"{what}: content has digest {digest}, not the pinned {pin}; the image at the URL "
                    "changed or the pin is wrong")
            image = validate.inspect(Path(tmp), info.content_type, what)
            self._commit(Path(tmp), digest, sink.size, image, what)
            return digest
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def _commit(self, tmp: Path, digest: str, size: int, image: validate.ImageInfo, what: str) -> None:
        dest = self._data_path(digest)
        with self._lock:
            created = not dest.exists()
            if created:
                os.chmod(tmp, 0o644)  # QEMU runs as another user and reads it through an overlay
                os.rename(tmp, dest)
                fsync_dir(self.data_dir)
                failpoints.hit("image.pull.after_rename")
            try:
                self._db.execute(
                    "INSERT INTO images(digest, size, format, virtual_size, pulled_at) VALUES (?,?,?,?,?) "
                    "ON CONFLICT(digest) DO UPDATE SET pulled_at=excluded.pulled_at",
                    (digest, size, image.format, image.virtual_size, time.time()))
            except sqlite3.Error as exc:
                if created:
                    dest.unlink(missing_ok=True)
                raise db_error(exc, what) from exc
        log.info("%s stored as %s (%s, %d bytes)", what, digest, image.format, size)

    def _name(self, name: str, digest: str) -> None:
        """Point ``name`` at ``digest``; the digest it pointed at before is dropped when nothing needs it."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                if not self._db.execute("SELECT 1 FROM images WHERE digest=?", (digest,)).fetchone():
                    self._db.execute("ROLLBACK")
                    raise errors.Unavailable(f"image {name!r} was removed while being pulled; pull again")
                old = self._db.execute("SELECT digest FROM names WHERE name=?", (name,)).fetchone()
                self._db.execute("INSERT OR REPLACE INTO names(name, digest) VALUES (?,?)", (name, digest))
                self._db.execute("UPDATE images SET pulled_at=? WHERE digest=?", (time.time(), digest))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise db_error(exc, f"image {name!r}") from exc
            if old and old[0] != digest:
                self._drop_if_unneeded(old[0])

    # -- removal --------------------------------------------------------------------------------------------

    def remove(self, name_or_ref: str) -> None:
        """Remove the image the ref resolves to, with all its names.  Idempotent.  Refused with
        FAILED_PRECONDITION while ``in_use()`` holds its digest (a container uses it)."""
        digest = self._resolve(name_or_ref)
        if digest is None:
            return
        if digest in self.in_use():  # issue 16: an image a container uses is not removed (the kubelet's GC skips it)
            raise errors.FailedPrecondition(f"image {name_or_ref} is used by a container; remove the containers "
                                            "that use it first")
        with self._lock:
            self._db.execute("DELETE FROM names WHERE digest=?", (digest,))
            failpoints.hit("image.remove.after_unname")
            self._drop_if_unneeded(digest)

    def _drop_if_unneeded(self, digest: str) -> None:
        with self._lock:
            if self._db.execute("SELECT 1 FROM names WHERE digest=?", (digest,)).fetchone():
                return
            if digest in self.in_use():
                log.info("image %s has no names left but a container uses it: data kept", digest)
                return
            self._db.execute("DELETE FROM images WHERE digest=?", (digest,))
            self._data_path(digest).unlink(missing_ok=True)
            log.info("image %s removed", digest)

    def cleanup_at_start(self) -> None:
        """Remove tmp files, data files without an index row, rows without a data file, and nameless images
        no container uses.  Call before serving (no pull may be running)."""
        with self._lock:
            for p in self.tmp_dir.iterdir():
                log.info("removing leftover partial download %s", p)
                remove_path(p)
            indexed = {r[0] for r in self._db.execute("SELECT digest FROM images")}
            for p in self.data_dir.iterdir():
                if f"sha256:{p.name}" not in indexed:
                    log.info("removing unindexed image data %s", p)
                    remove_path(p)
            for digest in sorted(indexed):
                if not self._data_path(digest).is_file():
                    log.warning("image %s is indexed but its data is missing: forgetting it", digest)
                    self._db.execute("DELETE FROM names WHERE digest=?", (digest,))
                    self._db.execute("DELETE FROM images WHERE digest=?", (digest,))
                else:
                    self._drop_if_unneeded(digest)

    # -- helpers --------------------------------------------------------------------------------------------

    def _resolve_name(self, name: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT digest FROM names WHERE name=?", (name,)).fetchone()
        return row[0] if row else None

    def _resolve(self, ref: str) -> str | None:
        """The digest a ref names, if it is in the index (an exact name such as ``host/repo:tag`` first)."""
        bare = ref.strip().removeprefix(names.PREFIX)
        exact = self._resolve_name(bare)
        if exact is None and "@" not in bare and bare.rfind(":") <= bare.rfind("/"):
            exact = self._resolve_name(f"{bare}:latest")  # "host/repo" means "host/repo:latest", as containerd
        if exact is not None:
            return exact
        digest = names.digest_of(ref)
        if digest is None:
            try:
                parsed = names.parse(ref)
            except errors.InvalidArgument:
                return None
            digest = parsed.digest
            if digest is None:
                with self._lock:
                    row = self._db.execute("SELECT digest FROM names WHERE name=?", (parsed.name,)).fetchone()
                return row[0] if row else None
        with self._lock:
            row = self._db.execute("SELECT 1 FROM images WHERE digest=?", (digest,)).fetchone()
        return digest if row else None

    def _record(self, digest: str) -> ImageRecord | None:
        with self._lock:
            row = self._db.execute("SELECT size, format, virtual_size, pulled_at FROM images WHERE digest=?",
                                   (digest,)).fetchone()
            if row is None:
                return None
            named = tuple(sorted(r[0] for r in self._db.execute("SELECT name FROM names WHERE digest=?",
                                                                  (digest,))))
        return ImageRecord(digest, named, row[0], self._data_path(digest), row[1], row[2], row[3])

    def _data_path(self, digest: str) -> Path:
        return self.data_dir / digest.removeprefix("sha256:")
