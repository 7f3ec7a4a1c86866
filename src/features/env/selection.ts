/**
 * Which of the target's variables the app gets: the part of the `env` feature that decides,
 * shared by `mirror` (the app's environment) and `env` (printing it).
 */
import picomatch from 'picomatch';
import type { Variables } from './messages.js';

/**
 * Variables that describe this machine, its user and terminal rather than the service: the
 * app keeps its own. A target's PATH or HOME name the container's file system, not this one
 * (the app would not find its runtime); LANG, LC_* and TERM are the developer's terminal;
 * LD_PRELOAD and LD_LIBRARY_PATH would load the container's libraries into a local process
 * (and LD_PRELOAD carries mirrord's own layer); MIRRORD_* is mirrord's channel to the layer.
 * An --env-include that names one as written here (`PATH`, `LC_*`) takes it from the target
 * after all; a wider glob (`*`) does not.
 */
export const LOCAL_VARIABLES: readonly string[] = [
  'PATH',
  'HOME',
  'HOSTNAME',
  'USER',
  'LOGNAME',
  'SHELL',
  'PWD',
  'OLDPWD',
  'SHLVL',
  '_',
  'TMPDIR',
  'TERM',
  'TERM_*',
  'COLORTERM',
  'LANG',
  'LANGUAGE',
  'LC_*',
  'DISPLAY',
  'WAYLAND_DISPLAY',
  'XAUTHORITY',
  'XDG_*',
  'SSH_*',
  'DBUS_SESSION_BUS_ADDRESS',
  'LD_PRELOAD',
  'LD_LIBRARY_PATH',
  'MIRRORD_*',
];

export interface EnvSettings {
  /** Take variables from the target at all (false: --no-env). */
  fromTarget: boolean;
  /** Names (globs) to take from the target; empty: every one. */
  include: readonly string[];
  /** Names (globs) never taken from the target, whatever `include` says. */
  exclude: readonly string[];
  /** Set for the app whatever the target and this machine say (--env-override). */
  override: ReadonlyMap<string, string>;
}

export const DEFAULT_ENV_SETTINGS: EnvSettings = {
  fromTarget: true,
  include: [],
  exclude: [],
  override: new Map(),
};

export interface AppEnvironment {
  env: Record<string, string>;
  /** The names whose value came from the target, sorted. */
  fromTarget: string[];
}

/** `NAME=VALUE`, as --env-override takes it; undefined when `text` is not one. */
export function overrideOf(text: string): [string, string] | undefined {
  const equals = text.indexOf('=');
  return equals > 0 ? [text.slice(0, equals), text.slice(equals + 1)] : undefined;
}

/**
 * The environment the app starts with: this machine's, then the target's variables that the
 * settings select over it, then the overrides.
 */
export function appEnvironment(
  local: NodeJS.ProcessEnv,
  target: Variables,
  settings: EnvSettings,
): AppEnvironment {
  const env: Record<string, string> = {};
  for (const [name, value] of Object.entries(local)) if (value !== undefined) env[name] = value;
  const named = new Set(settings.include);
  const included = settings.include.length > 0 ? matcher(settings.include) : () => true;
  const excluded = matcher([
    ...settings.exclude,
    ...LOCAL_VARIABLES.filter((glob) => !named.has(glob)),
  ]);
  const fromTarget = new Set<string>();
  if (settings.fromTarget) {
    for (const [name, value] of target) {
      if (!included(name) || excluded(name)) continue;
      env[name] = value;
      fromTarget.add(name);
    }
  }
  for (const [name, value] of settings.override) {
    env[name] = value;
    fromTarget.delete(name);
  }
  return { env, fromTarget: [...fromTarget].sort() };
}

/** Whether a name matches one of `globs` (`*`, `?`, `[…]`, as a shell matches file names). */
function matcher(globs: readonly string[]): (name: string) => boolean {
  return globs.length > 0 ? picomatch([...globs], { dot: true }) : () => false;
}
