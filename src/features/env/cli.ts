/** The CLI's side of the `env` feature: asks the agent for the target's environment. */
import { UsageError } from '../../cli/base-command.js';
import { bareNetns, type Target } from '../../cli/mirror-settings.js';
import type { AgentClient } from '../../protocol/client.js';
import { envGiven, envSettingsOf, type EnvConfig, type EnvFlags } from './flags.js';
import { ENV_FEATURE, parseEnvReply, type Variables } from './messages.js';
import { appEnvironment, type AppEnvironment } from './selection.js';

export async function targetVariables(client: AgentClient): Promise<Variables> {
  return parseEnvReply(await client.request(ENV_FEATURE, null));
}

/** Gives the environment an app of the session starts with, once the agent is there. */
export type EnvironmentSource = (client: AgentClient) => Promise<AppEnvironment>;

/**
 * Where the app's environment comes from for this target and these settings; undefined: the
 * local one as it is. A bare network namespace has no process and so no environment: there the
 * app keeps the local one, and asking for the target's is refused up front.
 */
export function appEnvironmentOf(
  target: Target,
  flags: EnvFlags,
  config: EnvConfig,
): EnvironmentSource | undefined {
  const settings = envSettingsOf(flags, config);
  const netns = bareNetns(target);
  if (netns !== undefined) {
    if (envGiven(flags, config) && settings.fromTarget) {
      throw new UsageError(
        `the target's environment needs a target with a process (--pid, --pod, --deployment, --statefulset): network namespace "${netns}" has none`,
      );
    }
    return undefined;
  }
  return async (client) => appEnvironment(process.env, await targetVariables(client), settings);
}
