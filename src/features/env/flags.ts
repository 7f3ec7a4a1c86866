/**
 * The `env` feature's flags and mirrord.json keys, shared by `mirror` and `env`, turned into
 * its settings: flags win over the file.
 */
import { Flags } from '@oclif/core';
import { UsageError } from '../../cli/base-command.js';
import { DEFAULT_ENV_SETTINGS, overrideOf, type EnvSettings } from './selection.js';

const ENV = 'ENVIRONMENT';

/** `NAME=VALUE`, as --env-override and mirrord.json's `envOverrides` take it. */
export const ENV_OVERRIDE = 'NAME=VALUE with a non-empty NAME';

export const envFlags = {
  env: Flags.boolean({
    summary:
      "Start the app with the target's environment variables over the local ones (default); --no-env keeps the local ones only.",
    allowNo: true,
    helpGroup: ENV,
  }),
  'env-include': Flags.string({
    summary: "Take only the target's variables whose names match GLOB (repeatable).",
    helpValue: 'GLOB',
    multiple: true,
    helpGroup: ENV,
  }),
  'env-exclude': Flags.string({
    summary: "Never take the target's variables whose names match GLOB (repeatable).",
    helpValue: 'GLOB',
    multiple: true,
    helpGroup: ENV,
  }),
  'env-override': Flags.string({
    summary: 'Give the app NAME=VALUE, whatever the target or this machine says (repeatable).',
    helpValue: 'NAME=VALUE',
    multiple: true,
    helpGroup: ENV,
  }),
};

export interface EnvFlags {
  env?: boolean;
  'env-include'?: string[];
  'env-exclude'?: string[];
  'env-override'?: string[];
}

/** The mirrord.json keys of the same settings. */
export interface EnvConfig {
  env?: boolean;
  envIncludes?: string[];
  envExcludes?: string[];
  envOverrides?: string[];
}

/** Whether any setting of the feature was given, by flag or file. */
export function envGiven(flags: EnvFlags, config: EnvConfig): boolean {
  return [
    flags.env,
    flags['env-include'],
    flags['env-exclude'],
    flags['env-override'],
    config.env,
    config.envIncludes,
    config.envExcludes,
    config.envOverrides,
  ].some((value) => value !== undefined);
}

export function envSettingsOf(flags: EnvFlags, config: EnvConfig): EnvSettings {
  const override = new Map<string, string>();
  for (const text of flags['env-override'] ?? config.envOverrides ?? []) {
    const pair = overrideOf(text);
    if (!pair) throw new UsageError(`--env-override "${text}" is not ${ENV_OVERRIDE}`);
    override.set(...pair);
  }
  return {
    fromTarget: flags.env ?? config.env ?? DEFAULT_ENV_SETTINGS.fromTarget,
    include: flags['env-include'] ?? config.envIncludes ?? DEFAULT_ENV_SETTINGS.include,
    exclude: flags['env-exclude'] ?? config.envExcludes ?? DEFAULT_ENV_SETTINGS.exclude,
    override,
  };
}
