/**
 * Which of the app's paths are the target's (the `files` feature's one decision, made in the
 * layer from what this module gives it): every absolute path is, but for the paths that belong
 * to this machine, to the app itself or to the developer, which stay local.
 */
import { homedir } from 'node:os';

/**
 * Directories (with everything below them) and files that stay local by default, and why:
 * - /proc, /sys, /dev, /run, /tmp, /var/tmp: the local process's own kernel view, devices and
 *   scratch space;
 * - /usr, /lib*, /bin, /sbin: the local runtime, its libraries and programs (the app runs on
 *   this machine's, not the target's);
 * - the loader's, the allocator's, the C library's and TLS's configuration (ld.so.*,
 *   malloc.conf, passwd, group, nsswitch,
 *   localtime, ssl, ca-certificates, pki, alternatives, locale, mime types): they describe this
 *   machine, and the local runtime needs its own;
 * - name resolution's own configuration (host.conf, gai.conf); and hosts and resolv.conf when
 *   the app's connections stay local (--no-outgoing): names then resolve as here. With
 *   outgoing connections through the target, a resolver that reads them itself (c-ares, dig,
 *   a JVM's) reads the target's, and reaches its nameserver through the target;
 * - the working directory and the home directory: the app's own code, its dependencies, the
 *   developer's configuration and caches; and the directories above them, which a runtime
 *   resolving a path below them looks at.
 * Everything else (/etc/app.conf, /app, /srv, /var/run/secrets, /config, …) is the target's.
 */
export const LOCAL_DIRECTORIES: readonly string[] = [
  '/proc',
  '/sys',
  '/dev',
  '/run',
  '/tmp',
  '/var/tmp',
  '/usr',
  '/lib',
  '/lib32',
  '/lib64',
  '/libx32',
  '/bin',
  '/sbin',
  '/etc/ssl',
  '/etc/ca-certificates',
  '/etc/pki',
  '/etc/alternatives',
];
export const LOCAL_FILES: readonly string[] = [
  '/etc/ld.so.cache',
  '/etc/ld.so.conf',
  '/etc/ld.so.preload',
  '/etc/malloc.conf',
  '/etc/passwd',
  '/etc/group',
  '/etc/shadow',
  '/etc/nsswitch.conf',
  '/etc/localtime',
  '/etc/timezone',
  '/etc/locale.alias',
  '/etc/locale.conf',
  '/etc/mime.types',
  '/etc/host.conf',
  '/etc/gai.conf',
];
/** Local only while names resolve here (see above). */
export const NAME_FILES: readonly string[] = ['/etc/hosts', '/etc/resolv.conf'];

export const FS_MODES = ['read', 'local'] as const;
export type FsMode = (typeof FS_MODES)[number];

export interface FsSettings {
  /** `read`: the target's paths are read from it; `local`: the app sees this machine's only. */
  mode: FsMode;
  /** More paths kept local (globs: `*` matches across `/`, as fnmatch does without FNM_PATHNAME). */
  local: readonly string[];
  /** Paths read from the target even when the defaults or `local` keep them here. */
  remote: readonly string[];
}

/** A directory as globs: itself and everything below it. */
const tree = (directory: string): string[] => {
  const trimmed = directory.replace(/\/+$/, '') || '/';
  return [trimmed, `${trimmed === '/' ? '' : trimmed}/*`];
};

/**
 * The directories above `directory`, `/` included, each alone: a runtime resolving a path
 * below it (node's realpath lstats every component) must find them here too.
 */
const ancestors = (directory: string): string[] => {
  const parts = directory.split('/').filter(Boolean);
  return ['/', ...parts.slice(0, -1).map((_, i) => `/${parts.slice(0, i + 1).join('/')}`)];
};

/**
 * The environment that tells the layer which paths are the target's: MIRRORD_FS (`read`, else
 * the feature is off), MIRRORD_FS_LOCAL and MIRRORD_FS_REMOTE (globs, one a line).
 * `namesFromTarget`: the app's names resolve through the target (the outgoing feature).
 */
export function layerFsEnvironment(
  settings: FsSettings,
  cwd: string,
  namesFromTarget: boolean,
): Record<string, string> {
  if (settings.mode !== 'read') return {};
  const local = [
    ...LOCAL_DIRECTORIES.flatMap(tree),
    ...LOCAL_FILES,
    ...(namesFromTarget ? [] : NAME_FILES),
    ...tree(cwd),
    ...ancestors(cwd),
    ...tree(homedir()),
    ...ancestors(homedir()),
    ...settings.local,
  ];
  return {
    MIRRORD_FS: 'read',
    MIRRORD_FS_LOCAL: local.join('\n'),
    MIRRORD_FS_REMOTE: settings.remote.join('\n'),
  };
}
