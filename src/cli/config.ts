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
}

export const CONFIG_FILE = 'mirrord.json';

type Check = (value: unknown) => boolean;
const isPort: Check = (v) => Number.isInteger(v) && (v as number) >= 1 && (v as number) <= 65535;
const KEYS: Record<keyof MirrorConfig, [Check, string]> = {
  pid: [(v) => Number.isInteger(v) && (v as number) > 0, 'a process id'],
  netns: [(v) => typeof v === 'string' && v.length > 0, 'a network namespace name'],
  ports: [
    (v) => Array.isArray(v) && v.every((p) => typeof p === 'string' || isPort(p)),
    'a list of "REMOTE[:LOCAL]"',
  ],
  ignorePorts: [(v) => Array.isArray(v) && v.every(isPort), 'a list of ports'],
  midStream: [(v) => typeof v === 'boolean', 'true or false'],
};

export class ConfigError extends Error {}

/**
 * Reads `file`, or `mirrord.json` in `cwd` when no file is named (absent is fine then), and
 * checks every key: a typo must not silently mirror the wrong thing.
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
  const config: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(parsed)) {
    const rule = KEYS[key as keyof MirrorConfig];
    if (!rule) {
      throw new ConfigError(
        `config ${path}: unknown key "${key}" (known: ${Object.keys(KEYS).join(', ')})`,
      );
    }
    if (!rule[0](value)) throw new ConfigError(`config ${path}: "${key}" must be ${rule[1]}`);
    config[key] = key === 'ports' ? (value as unknown[]).map(String) : value;
  }
  if (config.pid !== undefined && config.netns !== undefined) {
    throw new ConfigError(`config ${path}: give "pid" or "netns", not both`);
  }
  return config as MirrorConfig;
}
