import { Flags } from '@oclif/core';
import { EXIT, MirrordCommand, UsageError } from '../cli/base-command.js';
import { CONFIG_FILE, loadMirrorConfig } from '../cli/config.js';
import { bareNetns, localPrivilegesProblem } from '../cli/mirror-settings.js';
import { agentPlacer, resolveTarget, targetFlags } from '../cli/target-flags.js';
import { targetVariables } from '../features/env/cli.js';
import { envFlags, envSettingsOf } from '../features/env/flags.js';
import { appEnvironment } from '../features/env/selection.js';
import type { PlacedAgent } from '../platform/placed-agent.js';
import { AgentClient } from '../protocol/client.js';

/** A name a POSIX shell can assign; others cannot be exported by `eval`. */
const SHELL_NAME = /^[A-Za-z_][A-Za-z0-9_]*$/;

export default class EnvCommand extends MirrordCommand {
  static override summary =
    'Print the environment that `mirror` would start an app with: the target’s variables over the local ones.';
  static override description =
    'Places an agent on the target as `mirror` does, takes the environment the target process started with, selects from it with the same flags and mirrord.json keys, and prints the result: NAME=VALUE lines, a JSON object (--json), or export lines for a shell (--export).';
  static override usage = ['<%= command.id %> TARGET [FLAGS]'];
  static override examples = [
    '<%= config.bin %> env --pod api-7f9 --json',
    'eval "$(<%= config.bin %> env --deployment api --export)"',
    '<%= config.bin %> env --pid 4242 --env-include "DB_*"',
  ];

  static override flags = {
    ...targetFlags,
    ...envFlags,
    json: Flags.boolean({
      summary: 'Print a JSON object of the variables.',
      exclusive: ['export'],
    }),
    export: Flags.boolean({
      summary: "Print `export NAME='VALUE'` lines, for eval in a POSIX shell.",
    }),
    config: Flags.string({
      summary: `Settings file (default: ./${CONFIG_FILE} when present); flags win over it.`,
      helpValue: 'FILE',
    }),
  };

  async run(): Promise<void> {
    const { flags } = await this.parse(EnvCommand);
    const config = loadMirrorConfig(flags.config);
    const target = resolveTarget(flags, config);
    const netns = bareNetns(target);
    if (netns !== undefined) {
      throw new UsageError(
        `network namespace "${netns}" has no process and so no environment: give --pid, --pod, --deployment or --statefulset`,
      );
    }
    const settings = envSettingsOf(flags, config);
    const privilegesIssue = 'local' in target ? localPrivilegesProblem() : undefined;
    if (privilegesIssue) this.error(privilegesIssue, { exit: EXIT.failure });
    // Ctrl-C stops what is under way at its next step (placing a Job watches the signal), and
    // what was placed is removed on the way out.
    const abort = new AbortController();
    for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
      process.on(signal, () => abort.abort());
    }
    const goOn = <T>(value: T): T => {
      if (abort.signal.aborted) {
        throw Object.assign(new Error('interrupted'), { oclif: { exit: EXIT.interrupted } });
      }
      return value;
    };
    const progress = (note: string): void => void process.stderr.write(`mirrord: ${note}\n`);
    let agent: PlacedAgent | undefined;
    let client: AgentClient | undefined;
    try {
      const placeAgent = await agentPlacer(target, flags, config, abort.signal);
      agent = goOn(await placeAgent(progress));
      client = goOn(
        await AgentClient.start(await agent.connect(), {
          clientName: 'mirrord env',
          secret: agent.secret,
        }),
      );
      // A failed session rejects the request under way with the same error, said once.
      client.on('error', () => undefined);
      const variables = goOn(await targetVariables(client));
      const { env } = appEnvironment(process.env, variables, settings);
      process.stdout.write(print(env, flags.json ? 'json' : flags.export ? 'export' : 'lines'));
    } finally {
      await client?.close();
      await agent?.stop();
    }
  }
}

function print(env: Record<string, string>, format: 'json' | 'export' | 'lines'): string {
  const names = Object.keys(env).sort();
  if (format === 'json') {
    return `${JSON.stringify(Object.fromEntries(names.map((name) => [name, env[name]])), null, 2)}\n`;
  }
  if (format === 'lines') return names.map((name) => `${name}=${env[name]}\n`).join('');
  const skipped = names.filter((name) => !SHELL_NAME.test(name));
  if (skipped.length > 0) {
    process.stderr.write(
      `mirrord: not exported, not a shell variable name: ${skipped.join(', ')}\n`,
    );
  }
  return names
    .filter((name) => SHELL_NAME.test(name))
    .map((name) => `export ${name}='${env[name]!.replaceAll("'", `'\\''`)}'\n`)
    .join('');
}
