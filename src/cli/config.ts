import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';

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
  agentPullPolicy?: 'Always' | 'IfNotPresent' | 'Never';
  agentPullSecrets?: string[];
  agentCapabilities?: boolean;
  agentTtl?: number;
  agentIdleTimeout?: number;
  agentStartupTimeout?: number;
  requestTimeout?: number;
}

export const CONFIG_FILE = 'mirrord.json';

/** The keys that name what is mirrored: a file names at most one. */
export const LOCAL_TARGET_KEYS = ['pid', 'netns'] as const;
export const KUBE_TARGET_KEYS = ['pod', 'deployment', 'statefulset'] as const;

/** A Kubernetes object name (DNS-1123 subdomain): what pods, workloads and namespaces are called. */
export function isKubeName(value: unknown): value is string {
  return (
    typeof value === 'string' &&
    value.length <= 253 &&
    /^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$/.test(value)
  );
}

type Check = (value: unknown) => boolean;
type Rules = Partial<Record<keyof MirrorConfig, [Check, string]>>;
const isPort: Check = (v) => Number.isInteger(v) && (v as number) >= 1 && (v as number) <= 65535;
const isSeconds =
  (min: number): Check =>
  (v) =>
    Number.isInteger(v) && (v as number) >= min;
const isText: Check = (v) => typeof v === 'string' && v.length > 0;
const NAME = 'a Kubernetes name (lower case letters, digits, "-" and ".")';

/** Keys whatever the target. */
const COMMON: Rules = {
  ports: [
    (v) => Array.isArray(v) && v.every((p) => typeof p === 'string' || isPort(p)),
    'a list of "REMOTE[:LOCAL]"',
  ],
  ignorePorts: [(v) => Array.isArray(v) && v.every(isPort), 'a list of ports'],
  midStream: [(v) => typeof v === 'boolean', 'true or false'],
};
const LOCAL: Rules = {
  pid: [(v) => Number.isInteger(v) && (v as number) > 0, 'a process id'],
  netns: [isText, 'a network namespace name'],
};
const KUBE: Rules = {
  pod: [isKubeName, NAME],
  deployment: [isKubeName, NAME],
  statefulset: [isKubeName, NAME],
  container: [isKubeName, NAME],
  namespace: [isKubeName, NAME],
  context: [isText, 'a context name of the kubeconfig'],
  kubeconfig: [isText, 'a file path'],
  agentImage: [isText, 'an image reference, e.g. ghcr.io/mirrord-dev/mirrord-agent:0.1.0'],
  agentPullPolicy: [
    (v) => v === 'Always' || v === 'IfNotPresent' || v === 'Never',
    'Always, IfNotPresent or Never',
  ],
  agentPullSecrets: [(v) => Array.isArray(v) && v.every(isKubeName), 'a list of secret names'],
  agentCapabilities: [(v) => typeof v === 'boolean', 'true or false'],
  agentTtl: [isSeconds(0), 'a number of seconds (0 or more)'],
  agentIdleTimeout: [isSeconds(1), 'a number of seconds (1 or more)'],
  agentStartupTimeout: [isSeconds(1), 'a number of seconds (1 or more)'],
  requestTimeout: [isSeconds(1), 'a number of seconds (1 or more)'],
};

export class ConfigError extends Error {}

/**
 * Reads `file`, or `mirrord.json` in `cwd` when no file is named (absent is fine then), and
 * checks every key: a typo must not silently mirror the wrong thing. A file that names a local
 * target knows only the local keys (Kubernetes settings there would be ignored, so they are
 * refused), one that names a Kubernetes target only the Kubernetes keys.
 */
export function loadMirrorConfig(file: string | undefined, cwd = process.cwd()): MirrorConfig {
  const path = file ?? join(cwd, CONFIG_FILE);
  if (!file && !existsSync(path)) return {};
  let parsed: unknown;
  try {
    parsed = JSON.parse(readFileSync(path, 'utf8'));
  } catch (error) {
    const reason =
      (error as NodeJS.ErrnoException).code === 'ENOENT'
        ? 'no such file'
        : (error as Error).message;
    throw new ConfigError(`config ${path}: ${reason}`);
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
    throw new ConfigError(`config ${path}: expected a JSON object of settings`);
  }
  const keys = Object.keys(parsed);
  const targets = keys.filter((key) =>
    [...LOCAL_TARGET_KEYS, ...KUBE_TARGET_KEYS].includes(key as never),
  );
  if (targets.length > 1) {
    throw new ConfigError(
      `config ${path}: give one target, not ${targets.map((key) => `"${key}"`).join(' and ')}`,
    );
  }
  const [target] = targets;
  const local = LOCAL_TARGET_KEYS.includes(target as never);
  const kube = KUBE_TARGET_KEYS.includes(target as never);
  const rules: Rules = local
    ? { ...LOCAL, ...COMMON }
    : kube
      ? { ...KUBE, ...COMMON }
      : { ...LOCAL, ...COMMON, ...KUBE };
  const config: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(parsed)) {
    const rule = rules[key as keyof MirrorConfig];
    if (!rule) {
      if (local && key in KUBE) {
        throw new ConfigError(
          `config ${path}: "${key}" applies to Kubernetes targets (pod, deployment, statefulset), not to "${target}"`,
        );
      }
      throw new ConfigError(
        `config ${path}: unknown key "${key}" (known: ${Object.keys(rules).join(', ')})`,
      );
    }
    if (!rule[0](value)) throw new ConfigError(`config ${path}: "${key}" must be ${rule[1]}`);
    config[key] = key === 'ports' ? (value as unknown[]).map(String) : value;
  }
  return config as MirrorConfig;
}
