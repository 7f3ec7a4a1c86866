/**
 * The agent's side of the `files` feature: the target's file system as the target sees it,
 * read-only. Every path is resolved from the target's root (`/proc/PID/root`, which shows its
 * mount namespace: its image, Secrets, ConfigMaps and volumes) by openat2 with
 * RESOLVE_IN_ROOT, so `..` and absolute symlinks resolve as they would in the target and can
 * never lead out of it; a /proc magic link that would is refused (EACCES, and a warning).
 */
import * as fs from 'node:fs';
import { constants, existsSync } from 'node:fs';
import { readdir } from 'node:fs/promises';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { getSystemErrorName, promisify } from 'node:util';
import { packageRoot } from '../../package-root.js';
import {
  MAX_READ_BYTES,
  type FileKind,
  type FileReply,
  type FileRequest,
  type FileResults,
  type FileStat,
} from './messages.js';

interface NativeFiles {
  /** A descriptor, or -errno. */
  openInRoot(root: string, path: string, flags: number): Promise<number>;
  /** The symlink's target, or -errno. */
  readLinkAt(fd: number): string | number;
}

let native: NativeFiles | undefined;
function loadNative(): NativeFiles {
  if (native) return native;
  const path = join(packageRoot(), 'build', 'Release', 'mirrord_files.node');
  if (!existsSync(path))
    throw new Error(`the files addon is not built (${path}); run npm run build`);
  native = createRequire(import.meta.url)(path) as NativeFiles;
  return native;
}

/** Files a session may hold open at once; one more open fails as the app's would (EMFILE). */
export const MAX_OPEN_FILES = 1024;

class Failure extends Error {
  constructor(readonly errno: string) {
    super(errno);
  }
}

const fstatAsync = promisify(fs.fstat);
const close = promisify(fs.close);
const read = promisify(fs.read);
/** Not in Node's constants: a descriptor that only names a file (Linux, every architecture but a few). */
const O_PATH = 0o10000000;

function kindOf(mode: number): FileKind {
  switch (mode & constants.S_IFMT) {
    case constants.S_IFREG:
      return 'file';
    case constants.S_IFDIR:
      return 'dir';
    case constants.S_IFLNK:
      return 'symlink';
    default:
      return 'other';
  }
}

async function statOf(fd: number): Promise<FileStat> {
  const s = await fstatAsync(fd, { bigint: true });
  return {
    kind: kindOf(Number(s.mode)),
    mode: Number(s.mode),
    size: Number(s.size),
    uid: Number(s.uid),
    gid: Number(s.gid),
    ino: Number(s.ino),
    nlink: Number(s.nlink),
    dev: Number(s.dev),
    atimeNs: s.atimeNs,
    mtimeNs: s.mtimeNs,
    ctimeNs: s.ctimeNs,
  };
}

async function readAt(fd: number, offset: number, length: number): Promise<Buffer> {
  const buffer = Buffer.allocUnsafe(Math.min(length, MAX_READ_BYTES));
  const { bytesRead } = await read(fd, buffer, 0, buffer.length, offset);
  return buffer.subarray(0, bytesRead);
}

export class TargetFiles {
  readonly #root: string;
  readonly #warn: (message: string) => void;
  readonly #open = new Map<number, number>();
  #nextHandle = 1;

  /** `pid`: a process of the target; `warn`: tells the session of a refused path. */
  constructor(pid: number, warn: (message: string) => void) {
    this.#root = `/proc/${pid}/root`;
    this.#warn = warn;
    loadNative();
  }

  async serve<Op extends FileRequest['op']>(
    request: FileRequest & { op: Op },
  ): Promise<FileReply<Op>> {
    try {
      return { errno: null, result: (await this.#run(request)) as FileResults[Op] };
    } catch (error) {
      if (error instanceof Failure) return { errno: error.errno, result: null };
      const code = (error as NodeJS.ErrnoException).code;
      if (code) return { errno: code, result: null };
      throw error;
    }
  }

  /** Closes what the session left open. */
  async close(): Promise<void> {
    const fds = [...this.#open.values()];
    this.#open.clear();
    await Promise.all(fds.map((fd) => close(fd).catch(() => undefined)));
  }

  async #run(request: FileRequest): Promise<FileResults[FileRequest['op']]> {
    switch (request.op) {
      case 'stat': {
        const flags = O_PATH | (request.follow ? 0 : constants.O_NOFOLLOW);
        return this.#with(request.path, flags, statOf);
      }
      case 'open': {
        const fd = await this.#openInRoot(request.path, constants.O_RDONLY);
        let handle = 0;
        try {
          const stat = await statOf(fd);
          if (stat.kind === 'dir') throw new Failure('EISDIR');
          const head = await readAt(fd, 0, MAX_READ_BYTES);
          // All of it (a short read is the end): nothing is left to read by handle.
          if (head.length === MAX_READ_BYTES) {
            if (this.#open.size >= MAX_OPEN_FILES) throw new Failure('EMFILE');
            handle = this.#nextHandle++;
            this.#open.set(handle, fd);
          }
          return { handle, stat, head };
        } finally {
          if (handle === 0) await close(fd);
        }
      }
      case 'read': {
        return readAt(this.#fd(request.handle), request.offset, request.length);
      }
      case 'close': {
        const fd = this.#fd(request.handle);
        this.#open.delete(request.handle);
        await close(fd);
        return null;
      }
      case 'list':
        return this.#with(request.path, constants.O_RDONLY | constants.O_DIRECTORY, async (fd) => {
          const entries = await readdir(`/proc/self/fd/${fd}`, { withFileTypes: true });
          return entries.map((entry): [string, FileKind] => [
            entry.name,
            entry.isFile()
              ? 'file'
              : entry.isDirectory()
                ? 'dir'
                : entry.isSymbolicLink()
                  ? 'symlink'
                  : 'other',
          ]);
        });
      case 'readlink':
        return this.#with(request.path, O_PATH | constants.O_NOFOLLOW, async (fd) => {
          // readlink(2) of what is not a link is EINVAL; readlinkat on its descriptor says ENOENT.
          if ((await statOf(fd)).kind !== 'symlink') throw new Failure('EINVAL');
          const target = loadNative().readLinkAt(fd);
          if (typeof target === 'number') throw new Failure(getSystemErrorName(target));
          return target;
        });
    }
  }

  #fd(handle: number): number {
    const fd = this.#open.get(handle);
    if (fd === undefined) throw new Failure('EBADF');
    return fd;
  }

  async #with<T>(path: string, flags: number, use: (fd: number) => Promise<T>): Promise<T> {
    const fd = await this.#openInRoot(path, flags);
    try {
      return await use(fd);
    } finally {
      await close(fd);
    }
  }

  async #openInRoot(path: string, flags: number): Promise<number> {
    // openat2 refuses any flag but O_DIRECTORY and O_NOFOLLOW beside O_PATH; O_NOCTTY keeps a
    // terminal of the target's from becoming the agent's.
    const fd = await loadNative().openInRoot(
      this.#root,
      path,
      flags & O_PATH ? flags : flags | constants.O_NOCTTY,
    );
    if (fd >= 0) return fd;
    const errno = getSystemErrorName(fd);
    // RESOLVE_NO_MAGICLINKS and a loop of symlinks both say ELOOP; either way the app gets
    // the refusal a sandbox gives, and the session a line saying which path.
    if (errno === 'ELOOP') {
      this.#warn(
        `refused ${path}: it resolves through a /proc link out of the target's root, or a symlink loop`,
      );
      throw new Failure('EACCES');
    }
    throw new Failure(errno);
  }
}
