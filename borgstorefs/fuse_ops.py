"""The pyfuse3 adapter: turns kernel requests into `FileSystem` calls and results into replies.

Every handler is wrapped by `errnos.errno_boundary`, so any exception becomes
``FUSEError(errno)`` and is logged there; one failing request never ends the
main loop. Extended attributes are not implemented: pyfuse3 then returns
ENOSYS, and the kernel stops sending them. ``access`` is not implemented
either: with ``-o allow_other`` the kernel checks mode bits itself
(``default_permissions``), and otherwise only the mounting user, who owns
everything, can enter the mount.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pyfuse3

from .errnos import errno_boundary
from .fs import Attributes, FileSystem
from .handles import KernelPages
from .inodes import ROOT_INODE, InodeNo

__all__ = ["Operations"]

logger = logging.getLogger(__name__)

handler = errno_boundary(pyfuse3.FUSEError)


class Operations(pyfuse3.Operations):
    """pyfuse3 handlers for one mounted `FileSystem`.

    Attributes carry the mount's timeouts: ``attr_timeout`` for attributes,
    ``entry_timeout`` for names, ``negative_timeout`` for names that do not
    exist (the kernel caches those negative entries too).
    """

    supports_dot_lookup = True
    enable_writeback_cache = False  # size and mtime stay ours, and close reports store errors

    def __init__(self, fs: FileSystem) -> None:
        super().__init__()
        self.fs = fs
        options = fs.options
        self._uid = options.uid
        self._gid = options.gid
        self._attr_timeout = options.attr_timeout
        self._entry_timeout = options.entry_timeout
        self._negative_timeout = options.negative_timeout
        fs.invalidate_entry = self._invalidate_entry
        fs.kernel_pages = KernelPages(pyfuse3.notify_store, _drop_pages)

    def _entry(self, attributes: Attributes) -> pyfuse3.EntryAttributes:
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = attributes.inode
        entry.st_mode = attributes.mode
        entry.st_nlink = 1  # also for directories: tools then make no guesses from the link count
        entry.st_uid = self._uid
        entry.st_gid = self._gid
        entry.st_size = attributes.size
        entry.st_blksize = 4096
        entry.st_blocks = (attributes.size + 511) // 512
        entry.st_mtime_ns = attributes.mtime_ns
        entry.st_ctime_ns = attributes.mtime_ns
        entry.st_atime_ns = attributes.mtime_ns
        entry.attr_timeout = self._attr_timeout
        entry.entry_timeout = self._entry_timeout
        if attributes.inode == ROOT_INODE:
            # Never cached, so that a stat of the mount point reaches the daemon and
            # fails with ENOTCONN once it died, instead of showing an intact directory.
            entry.attr_timeout = 0
        return entry

    @staticmethod
    def _invalidate_entry(parent: InodeNo, name: bytes) -> None:
        pyfuse3.invalidate_entry_async(parent, name, ignore_enoent=True)

    # Names and attributes

    @handler
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Return the entry of *name*; a missing name returns inode 0, a negative entry the kernel caches.

        A found entry counts one kernel lookup (except ``.`` and ``..``).
        ENOTDIR if the parent is a file, ENAMETOOLONG or EINVAL for names that
        cannot be keys, EIO if the store fails.
        """
        attributes = await self.fs.lookup(parent_inode, name)
        if attributes is None:
            negative = pyfuse3.EntryAttributes()
            negative.st_ino = pyfuse3.InodeT(0)
            negative.entry_timeout = self._negative_timeout
            return negative
        return self._entry(attributes)

    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        """Drop kernel lookups. Never raises: no request waits for a reply."""
        try:
            self.fs.forget(list(inode_list))
        except Exception:
            logger.exception("forget of %d inodes failed", len(inode_list))

    @handler
    async def getattr(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        """Return the attributes of *inode*; ENOENT if its item is gone, ESTALE if the inode is unknown."""
        return self._entry(await self.fs.getattr(inode))

    @handler
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        """Apply size and mtime changes and return the new attributes; mode, owner and atime are ignored.

        EPERM in the trash, EROFS on a read-only mount.
        """
        size = attr.st_size if fields.update_size else None
        mtime_ns = attr.st_mtime_ns if fields.update_mtime else None
        return self._entry(await self.fs.setattr(inode, size=size, mtime_ns=mtime_ns, fh=fh))

    @handler
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        """Return the backend's capacity (or 1 PiB where unknown) and the longest storable name."""
        stats = await self.fs.statfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = stats.block_size
        data.f_frsize = stats.block_size
        data.f_blocks = stats.blocks
        data.f_bfree = stats.blocks_free
        data.f_bavail = stats.blocks_available
        data.f_files = stats.files
        data.f_ffree = stats.files_free
        data.f_favail = stats.files_free
        data.f_namemax = stats.name_max
        return data

    # Directories

    @handler
    async def opendir(self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileHandleT:
        """Return a directory handle; ENOTDIR for a file."""
        return pyfuse3.FileHandleT(await self.fs.opendir(inode))

    @handler
    async def readdir(self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        """Reply with entries from offset *start_id* until the kernel's buffer is full.

        Each entry the kernel accepts counts one lookup of its inode (this is
        ``readdirplus``), except ``.`` and ``..``. ENOENT if the namespace is
        gone, EIO if listing fails.
        """
        entries = await self.fs.readdir(fh, start_id)
        for entry in entries:
            attributes = self._entry(entry.attributes)
            if not entry.cacheable:
                attributes.attr_timeout = attributes.entry_timeout = 0
            if not pyfuse3.readdir_reply(token, entry.name, attributes, entry.next_offset):
                break
            self.fs.count_listed(fh, entry)

    @handler
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        """Close a directory handle."""
        await self.fs.releasedir(fh)

    @handler
    async def mkdir(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, mode: pyfuse3.ModeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        """Create a namespace at the root (counts one lookup); EPERM elsewhere, EEXIST if it exists."""
        return self._entry(await self.fs.mkdir(parent_inode, name))

    @handler
    async def rmdir(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext) -> None:
        """Remove an empty namespace; ENOTEMPTY if it contains live or soft-deleted items."""
        await self.fs.rmdir(parent_inode, name)

    # Names of files

    @handler
    async def unlink(self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext) -> None:
        """Soft-delete a live file or purge a file in the trash; open handles keep reading a soft-deleted file."""
        await self.fs.unlink(parent_inode, name)

    @handler
    async def rename(
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: pyfuse3.FileNameT,
        parent_inode_new: pyfuse3.InodeT,
        name_new: pyfuse3.FileNameT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        """Rename a file or restore one from the trash; EEXIST with RENAME_NOREPLACE or onto a live item.

        EPERM for namespaces, moves into the trash and restores under another
        name; EINVAL for RENAME_EXCHANGE.
        """
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @handler
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        target: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        """Fail with EPERM: the store has no symbolic links."""
        await self.fs.symlink()
        raise AssertionError("unreachable")

    @handler
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        """Fail with EPERM: an item has one name."""
        await self.fs.link()
        raise AssertionError("unreachable")

    @handler
    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        """Fail with EPERM: the store has no special files."""
        await self.fs.mknod()
        raise AssertionError("unreachable")

    # Open files

    @handler
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        flags: pyfuse3.FlagT,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        """Create and open an empty file (counts one lookup); the mode is ignored.

        EPERM in the trash, EROFS on a read-only mount, ENAMETOOLONG or EINVAL
        for names that cannot be stored.
        """
        fh, attributes = await self.fs.create(parent_inode, name, flags)
        info = pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=self.fs.uses_direct_io(flags))
        return info, self._entry(attributes)

    @handler
    async def open(self, inode: pyfuse3.InodeT, flags: pyfuse3.FlagT, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        """Open a file; the kernel keeps its cached pages if size and mtime are unchanged since they were cached.

        EISDIR for directories, EPERM for writing in the trash, EROFS for
        writing on a read-only mount, ENOENT if the item is gone.
        """
        fh, keep_cache = await self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache, direct_io=self.fs.uses_direct_io(flags))

    @handler
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> bytes:
        """Return up to *size* bytes at *off*; fewer only at the end of the file. ESTALE if the file was replaced."""
        return await self.fs.read(fh, off, size)  # type: ignore[return-value]  # a memoryview is a valid buffer

    @handler
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        """Stage *buf* at *off* and return its length; the store gets it at the next flush, fsync or close."""
        return await self.fs.write(fh, off, buf)

    @handler
    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        """Commit the file's changes at each ``close``; a failed store returns its errno to ``close``."""
        await self.fs.flush(fh)

    @handler
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        """Commit the file's changes durably before returning."""
        await self.fs.fsync(fh)

    @handler
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        """Close a handle; the last one commits what is left. The kernel discards errors here."""
        await self.fs.release(fh)


def _drop_pages(inode: int) -> None:
    """Drop the kernel's cached pages of *inode*; its attributes stay cached."""
    pyfuse3.invalidate_inode(pyfuse3.InodeT(inode), attr_only=False)
