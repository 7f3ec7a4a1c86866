/**
 * The `outgoing` feature's flags and mirrord.json keys, turned into its settings: flags win over
 * the file.
 */
import { Flags } from '@oclif/core';
import { UsageError } from '../../cli/base-command.js';
import {
  LOCALHOST_MODES,
  OUTGOING_RULE,
  outgoingRuleProblem,
  type LocalhostMode,
  type OutgoingSettings,
} from './policy.js';

const OUTGOING = 'OUTGOING';

export const outgoingFlags = {
  outgoing: Flags.boolean({
    summary:
      "Make the app's outgoing connections and name look-ups from the target (default); --no-outgoing: from this machine.",
    allowNo: true,
    helpGroup: OUTGOING,
  }),
  'outgoing-local': Flags.string({
    summary: 'Keep connections to this destination on this machine (repeatable).',
    helpValue: 'CIDR|HOST[:PORT]',
    multiple: true,
    helpGroup: OUTGOING,
  }),
  localhost: Flags.option({
    summary:
      "remote: the app's localhost is the target's, where its sidecars listen (default); local: this machine's.",
    options: LOCALHOST_MODES,
    helpGroup: OUTGOING,
  })(),
};

export interface OutgoingFlags {
  outgoing?: boolean;
  'outgoing-local'?: string[];
  localhost?: LocalhostMode;
}

export interface OutgoingConfig {
  outgoing?: boolean;
  outgoingLocals?: string[];
  localhost?: LocalhostMode;
}

/**
 * The outgoing settings: flags, else mirrord.json, else the defaults; `localhost` is the default
 * of the command (`session` keeps the app's localhost local: see its description).
 */
export function outgoingSettingsOf(
  flags: OutgoingFlags,
  config: OutgoingConfig,
  localhost: LocalhostMode = 'remote',
): OutgoingSettings {
  const local = flags['outgoing-local'] ?? config.outgoingLocals ?? [];
  for (const rule of local) {
    const problem = outgoingRuleProblem(rule);
    if (problem) {
      throw new UsageError(`--outgoing-local "${rule}": ${problem}; give ${OUTGOING_RULE}`);
    }
  }
  return {
    enabled: flags.outgoing ?? config.outgoing ?? true,
    local,
    localhost: flags.localhost ?? config.localhost ?? localhost,
  };
}
