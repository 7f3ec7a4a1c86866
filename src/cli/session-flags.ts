/**
 * The flags of the commands that run a session (`mirror`, and `session` for a process started
 * elsewhere), and their resolution with mirrord.json into the session's settings.
 */
import { Flags } from '@oclif/core';
import { appEnvironmentOf, type EnvironmentSource } from '../features/env/cli.js';
import { envFlags, type EnvFlags } from '../features/env/flags.js';
import type { FsSettings } from '../features/files/policy.js';
import { fsFlags, fsSettingsOf, type FsFlags } from '../features/files/flags.js';
import type { LocalhostMode, OutgoingSettings } from '../features/outgoing/policy.js';
import {
  outgoingFlags,
  outgoingSettingsOf,
  type OutgoingFlags,
} from '../features/outgoing/flags.js';
import { UsageError } from './base-command.js';
import {
  CONFIG_FILE,
  PORT_MAPPING,
  loadMirrorConfig,
  portMappingOf,
  type MirrorConfig,
  type PortMapping,
} from './config.js';
import type { Target } from './mirror-settings.js';
import { resolveTarget, targetFlags, type TargetFlags } from './target-flags.js';

/** --port REMOTE[:LOCAL]. */
const portMapping = Flags.custom<PortMapping>({
  parse: async (value, _context, flag) => {
    const mapping = portMappingOf(value);
    if (!mapping) throw new UsageError(`--${flag.name} "${value}" is not ${PORT_MAPPING}`);
    return mapping;
  },
});

export const sessionFlags = {
  ...targetFlags,
  port: portMapping({
    summary: 'Mirror remote port REMOTE into local port LOCAL (default: the same).',
    multiple: true,
    helpValue: 'REMOTE[:LOCAL]',
  }),
  'ignore-port': Flags.integer({
    summary: 'Never mirror this remote port, even when the app listens on it.',
    helpValue: 'PORT',
    multiple: true,
    min: 1,
    max: 65535,
  }),
  'mid-stream': Flags.boolean({
    summary: 'Also replay connections that were already open when mirroring started.',
    allowNo: true,
  }),
  ...envFlags,
  ...fsFlags,
  ...outgoingFlags,
  config: Flags.string({
    summary: `Settings file (default: ./${CONFIG_FILE} when present); flags win over it.`,
    helpValue: 'FILE',
  }),
};

export type SessionFlags = TargetFlags &
  EnvFlags &
  FsFlags &
  OutgoingFlags & {
    port?: PortMapping[];
    'ignore-port'?: number[];
    'mid-stream'?: boolean;
  };

/** A session's settings, from its command's flags and mirrord.json. */
export interface SessionSettings {
  config: MirrorConfig;
  target: Target;
  /** Remote port → local port. */
  ports: Map<number, number>;
  ignorePorts: Set<number>;
  midStream: boolean;
  appEnvironment: EnvironmentSource | undefined;
  files: FsSettings;
  outgoing: OutgoingSettings;
}

/** The settings: flags, else mirrord.json, else the defaults (`localhost`: the command's). */
export function sessionSettingsOf(
  flags: SessionFlags,
  localhost: LocalhostMode = 'remote',
): SessionSettings {
  const config = loadMirrorConfig(flags.config);
  // loadMirrorConfig checked every entry of `ports`.
  const mappings = flags.port ?? config.ports?.map((port) => portMappingOf(port)!) ?? [];
  const target = resolveTarget(flags, config);
  return {
    config,
    target,
    ports: new Map(mappings.map(({ remote, local }) => [remote, local])),
    ignorePorts: new Set(flags['ignore-port'] ?? config.ignorePorts ?? []),
    midStream: flags['mid-stream'] ?? config.midStream ?? false,
    appEnvironment: appEnvironmentOf(target, flags, config),
    files: fsSettingsOf(target, flags, config),
    outgoing: outgoingSettingsOf(flags, config, localhost),
  };
}
