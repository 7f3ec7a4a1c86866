/**
 * The `files` feature's flags and mirrord.json keys, turned into its settings: flags win over
 * the file.
 */
import { Flags } from '@oclif/core';
import { UsageError } from '../../cli/base-command.js';
import { bareNetns, type Target } from '../../cli/mirror-settings.js';
import { FS_MODES, type FsMode, type FsSettings } from './policy.js';

const FILES = 'FILES';

export const fsFlags = {
  fs: Flags.option({
    summary:
      "read: the app reads the target's files at their paths, but for this machine's own (default); local: only this machine's.",
    options: FS_MODES,
    helpGroup: FILES,
  })(),
  'fs-local': Flags.string({
    summary: 'Keep paths matching GLOB local (repeatable; * matches across /).',
    helpValue: 'GLOB',
    multiple: true,
    helpGroup: FILES,
  }),
  'fs-remote': Flags.string({
    summary: "Read paths matching GLOB from the target, even this machine's own (repeatable).",
    helpValue: 'GLOB',
    multiple: true,
    helpGroup: FILES,
  }),
};

export interface FsFlags {
  fs?: FsMode;
  'fs-local'?: string[];
  'fs-remote'?: string[];
}

export interface FsConfig {
  fs?: FsMode;
  fsLocals?: string[];
  fsRemotes?: string[];
}

/**
 * The settings for this target; a bare network namespace has no file system of its own to
 * read, so there the app reads this machine's, and asking for the target's is refused.
 */
export function fsSettingsOf(target: Target, flags: FsFlags, config: FsConfig): FsSettings {
  const mode = flags.fs ?? config.fs;
  const netns = bareNetns(target);
  if (netns !== undefined) {
    if (mode === 'read') {
      throw new UsageError(
        `--fs read needs a target with a process (--pid, --pod, --deployment, --statefulset): network namespace "${netns}" has no file system of its own`,
      );
    }
    return { mode: 'local', local: [], remote: [] };
  }
  return {
    mode: mode ?? 'read',
    local: flags['fs-local'] ?? config.fsLocals ?? [],
    remote: flags['fs-remote'] ?? config.fsRemotes ?? [],
  };
}
