import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { PULL_POLICIES, type PullPolicy } from '../platform/kube/agent-job.js';
import { TARGET_KINDS } from '../platform/kube/target-kinds.js';
import { ENV_OVERRIDE } from '../features/env/flags.js';
import { overrideOf } from '../features/env/selection.js';
import {
  LOCALHOST_MODES,
  OUTGOING_RULE,
  outgoingRuleProblem,
  type LocalhostMode,
} from '../features/outgoing/policy.js';
import { FS_MODES, type FsMode } from '../features/files/policy.js';
import { UsageError } from './base-command.js';

/** What `mirrord.json` may hold: the `mirror` command's settings. Flags win over it. */
export interface MirrorConfig {
  pid?: number;
  netns?: string;
  /** `REMOTE` or `REMOTE:LOCAL`, as with --port. */
  ports?: string[];
  ignorePorts?: number[];
  midStream?: boolean;
  pod?: string;
  deployment?: string;
  statefulset?: string;
  container?: string;
  namespace?: string;
  context?: string;
  kubeconfig?: string;
  agentImage?: string;
  agentPullPolicy?: PullPolicy;
  agentPullSecrets?: string[];
  agentPrivileged?: boolean;
  agentTtl?: number;
  agentIdleTimeout?: number;
  agentStartupTimeout?: number;
  requestTimeout?: number;
  env?: boolean;
  envIncludes?: string[];
  envExcludes?: string[];
  envOverrides?: string[];
  fs?: FsMode;
  fsLocals?: string[];
  fsRemotes?: string[];
  outgoing?: boolean;
  outgoingLocals?: string[];
  localhost?: LocalhostMode;
}
export type ConfigKey = keyof MirrorConfig;

export const CONFIG_FILE = 'mirrord.json';

/** The keys that name what is mirrored: a file names at most one. */
export const LOCAL_TARGET_KEYS = ['pid', 'netns'] as const;
export const KUBE_TARGET_KEYS = TARGET_KINDS;

/** What isKubeName accepts, for messages. */
export const KUBE_NAME = 'a Kubernetes name (lower case letters, digits, "-" and ".")';

/** A Kubernetes object name (DNS-1123 subdomain): what pods, workloads and namespaces are called. */
export function isKubeName(value: unknown): value is string {
  return (
    typeof value === 'string' &&
    value.length <= 253 &&
    /^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/.test(value)
  );
}

/** What --port and mirrord.json's `ports` take. */
export const PORT_MAPPING = 'REMOTE[:LOCAL] with ports from 1 to 65535';

/** A remote port mirrored into a local one. */
export interface PortMapping {
  remote: number;
  local: number;
}

/** `REMOTE` or `REMOTE:LOCAL`, each a port; undefined when `value` is not one. */
export function portMappingOf(value: string): PortMapping | undefined {
  const match = /^(\d{1,5})(?::(\d{1,5}))?$/.exec(value);
  const remote = Number(match?.[1]);
  const local = Number(match?.[2] ?? match?.[1]);
  return match && isPort(remote) && isPort(local) ? { remote, local } : undefined;
}

type Scope = 'local' | 'kube' | 'any';
/** What is wrong with `value` as the value of `key` (the message names the key), if anything. */
type Check = (value: unknown, key: string) => string | undefined;
interface Setting {
  /** The targets the key means something for. */
  scope: Scope;
  check: Check;
  /** A list: its flag may be given several times. */
  list?: true;
}

function isPort(value: unknown): value is number {
  return Number.isInteger(value) && (value as number) >= 1 && (value as number) <= 65535;
}
const isSeconds = (min: number) => (value: unknown) =>
  Number.isInteger(value) && (value as number) >= min;
const isText = (value: unknown) => typeof value === 'string' && value.length > 0;
const isBoolean = (value: unknown) => typeof value === 'boolean';

function one(scope: Scope, ok: (value: unknown) => boolean, expected: string): Setting {
  return { scope, check: (value, key) => (ok(value) ? undefined : `"${key}" must be ${expected}`) };
}

/** A list whose bad item is named by its place: `ports[1] "x" is not …`. */
function list(scope: Scope, ok: (item: unknown) => boolean, expected: string): Setting {
  return {
    scope,
    list: true,
    check: (value, key) => {
      if (!Array.isArray(value)) return `"${key}" must be a list`;
      const bad = value.findIndex((item) => !ok(item));
      return bad < 0
        ? undefined
        : `${key}[${bad}] ${JSON.stringify(value[bad])} is not ${expected}`;
    },
  };
}

/**
 * Every mirrord.json key. A key is its `mirror` flag in camelCase, plural when the flag is
 * repeated to give a list (--agent-pull-secret S1 --agent-pull-secret S2 is
 * `"agentPullSecrets": ["S1", "S2"]`): see flagOf. The order is the one error messages list.
 */
const SETTINGS: { [Key in ConfigKey]-?: Setting } = {
  pid: one('local', (v) => Number.isInteger(v) && (v as number) > 0, 'a process id'),
  netns: one('local', isText, 'a network namespace name'),
  pod: one('kube', isKubeName, KUBE_NAME),
  deployment: one('kube', isKubeName, KUBE_NAME),
  statefulset: one('kube', isKubeName, KUBE_NAME),
  container: one('kube', isKubeName, KUBE_NAME),
  namespace: one('kube', isKubeName, KUBE_NAME),
  context: one('kube', isText, 'a context name of the kubeconfig'),
  kubeconfig: one('kube', isText, 'a file path'),
  agentImage: one(
    'kube',
    isText,
    'an image reference, e.g. ghcr.io/mirrord-dev/mirrord-agent:0.1.0',
  ),
  agentPullPolicy: one(
    'kube',
    (v) => PULL_POLICIES.includes(v as PullPolicy),
    PULL_POLICIES.join(', ').replace(/, (?=[^,]*$)/, ' or '),
  ),
  agentPullSecrets: list('kube', isKubeName, `the name of a secret, ${KUBE_NAME}`),
  agentPrivileged: one('kube', isBoolean, 'true or false'),
  agentTtl: one('kube', isSeconds(0), 'a number of seconds (0 or more)'),
  agentIdleTimeout: one('kube', isSeconds(1), 'a number of seconds (1 or more)'),
  agentStartupTimeout: one('kube', isSeconds(1), 'a number of seconds (1 or more)'),
  requestTimeout: one('kube', isSeconds(1), 'a number of seconds (1 or more)'),
  ports: list(
    'any',
    (item) =>
      (typeof item === 'string' || typeof item === 'number') &&
      portMappingOf(String(item)) !== undefined,
    PORT_MAPPING,
  ),
  ignorePorts: list('any', isPort, 'a port from 1 to 65535'),
  midStream: one('any', isBoolean, 'true or false'),
  env: one('any', isBoolean, 'true or false'),
  envIncludes: list('any', isText, 'a glob of variable names'),
  envExcludes: list('any', isText, 'a glob of variable names'),
  envOverrides: list(
    'any',
    (item) => typeof item === 'string' && overrideOf(item) !== undefined,
    ENV_OVERRIDE,
  ),
  fs: one('any', (v) => (FS_MODES as readonly unknown[]).includes(v), 'read or local'),
  fsLocals: list('any', isText, 'a glob of paths'),
  fsRemotes: list('any', isText, 'a glob of paths'),
  outgoing: one('any', isBoolean, 'true or false'),
  outgoingLocals: list(
    'any',
    (item) => typeof item === 'string' && outgoingRuleProblem(item) === undefined,
    OUTGOING_RULE,
  ),
  localhost: one(
    'any',
    (v) => (LOCALHOST_MODES as readonly unknown[]).includes(v),
    'remote or local',
  ),
};

export const CONFIG_KEYS = Object.keys(SETTINGS) as ConfigKey[];

/** The `mirror` flag of a mirrord.json key: `agentPullSecrets` is --agent-pull-secret. */
export function flagOf(key: ConfigKey): string {
  const kebab = key.replace(/[A-Z]/g, (letter) => `-${letter.toLowerCase()}`);
  return SETTINGS[key].list ? kebab.replace(/s$/, '') : kebab;
}

/** The settings that mean something only for a Kubernetes target, besides naming it. */
export const KUBE_ONLY_KEYS = CONFIG_KEYS.filter(
  (key) => SETTINGS[key].scope === 'kube' && !(KUBE_TARGET_KEYS as readonly string[]).includes(key),
);

/** mirrord.json's problems are bad input: the line names the file (as the user named it). */
export class ConfigError extends UsageError {}

/** The settings file as the user knows it: as given to --config, else mirrord.json here. */
export function configFileName(file: string | undefined): string {
  return file ?? CONFIG_FILE;
}

/**
 * Reads `file`, or `mirrord.json` in `cwd` when no file is named (absent is fine then), and
 * checks every key: a typo must not silently mirror the wrong thing. A file that names a local
 * target knows only the local keys (Kubernetes settings there would be ignored, so they are
 * refused), one that names a Kubernetes target only the Kubernetes keys.
 */
export function loadMirrorConfig(file: string | undefined, cwd = process.cwd()): MirrorConfig {
  const path = file ?? join(cwd, CONFIG_FILE);
  const name = configFileName(file);
  if (!file && !existsSync(path)) return {};
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(path, 'utf8'));
  } catch (error) {
    const reason =
      (error as NodeJS.ErrnoException).code === 'ENOENT'
        ? 'no such file (from --config)'
        : (error as Error).message;
    throw new ConfigError(`${name}: ${reason}`);
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new ConfigError(`${name}: expected a JSON object of settings`);
  }
  const keys = Object.keys(parsed);
  const targets = keys.filter((key) =>
    [...LOCAL_TARGET_KEYS, ...KUBE_TARGET_KEYS].includes(key as never),
  );
  if (targets.length > 1) {
    throw new ConfigError(
      `${name}: give one target, not ${targets.map((key) => `"${key}"`).join(' and ')}`,
    );
  }
  const [target] = targets;
  const scope: Scope = LOCAL_TARGET_KEYS.includes(target as never)
    ? 'local'
    : KUBE_TARGET_KEYS.includes(target as never)
      ? 'kube'
      : 'any';
  const known = CONFIG_KEYS.filter(
    (key) => scope === 'any' || [scope, 'any'].includes(SETTINGS[key].scope),
  );
  const config: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(parsed)) {
    if (!known.includes(key as ConfigKey)) {
      if (scope === 'local' && KUBE_ONLY_KEYS.includes(key as ConfigKey)) {
        throw new ConfigError(
          `${name}: "${key}" applies to Kubernetes targets (pod, deployment, statefulset), not to "${target}"`,
        );
      }
      throw new ConfigError(`${name}: unknown key "${key}" (known: ${known.join(', ')})`);
    }
    const problem = SETTINGS[key as ConfigKey].check(value, key);
    if (problem) throw new ConfigError(`${name}: ${problem}`);
    config[key] = key === 'ports' ? (value as unknown[]).map(String) : value;
  }
  return config as MirrorConfig;
}
