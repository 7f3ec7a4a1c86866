import { Flags } from '@oclif/core';
import { MirrordCommand } from '../cli/base-command.js';
import type { TargetSpec } from '../agent/target.js';
import { runMirror, type MirrorEvent } from '../session/mirror.js';
import { placeLocalAgent } from '../platform/local/agent-process.js';
import { StatusLine } from '../cli/status-line.js';
import { CONFIG_FILE, loadMirrorConfig } from '../cli/config.js';

/** `REMOTE` or `REMOTE:LOCAL`, each a port. */
function parsePortMapping(value: string): [number, number] {
  const match = /^(\d{1,5})(?::(\d{1,5}))?$/.exec(value);
  const remote = Number(match?.[1]);
  const local = Number(match?.[2] ?? match?.[1]);
  if (!match || !(remote >= 1 && remote <= 65535) || !(local >= 1 && local <= 65535)) {
    throw new Error(`--port "${value}" is not REMOTE[:LOCAL] with ports from 1 to 65535`);
  }
  return [remote, local];
}

/** A target named by flags or by the config file, which hold the same two keys. */
function targetOf(settings: { pid?: number; netns?: string }): TargetSpec | undefined {
  if (settings.pid !== undefined) return { pid: settings.pid };
  if (settings.netns !== undefined) return { netns: settings.netns };
  return undefined;
}

export default class MirrorCommand extends MirrordCommand {
  static override summary = "Mirror a target's incoming TCP connections into a local process.";
  static override description =
    'Starts an agent on the target, runs COMMAND with the mirrord layer preloaded, and replays into it every connection that reaches the target on the ports COMMAND listens on. Exits with COMMAND’s exit code.';
  static override examples = [
    '<%= config.bin %> mirror --netns staging -- node server.js',
    '<%= config.bin %> mirror --pid 4242 --port 80:8080',
  ];
  // COMMAND's own arguments follow `--` and are not mirrord's flags.
  static override strict = false;

  static override flags = {
    pid: Flags.integer({
      summary: 'Mirror the network namespace of this local process.',
      min: 1,
      exclusive: ['netns'],
    }),
    netns: Flags.string({ summary: 'Mirror this named network namespace (ip netns).' }),
    port: Flags.string({
      summary: 'Mirror remote port REMOTE into local port LOCAL (default: the same).',
      multiple: true,
      helpValue: 'REMOTE[:LOCAL]',
    }),
    'ignore-port': Flags.integer({
      summary: 'Never mirror this remote port, even when COMMAND listens on it.',
      multiple: true,
      min: 1,
      max: 65535,
    }),
    'mid-stream': Flags.boolean({
      summary: 'Also replay connections that were already open when mirroring started.',
      allowNo: true,
    }),
    json: Flags.boolean({
      summary:
        'Print the session’s events (ready, listen, opened, closed, counters) as JSON lines on stdout.',
    }),
    config: Flags.string({
      summary: `Settings file (default: ./${CONFIG_FILE} when present); flags win over it.`,
    }),
  };

  async run(): Promise<void> {
    const { flags } = await this.parse(MirrorCommand);
    // oclif reorders repeated values of a non-strict command: COMMAND is what follows `--`.
    const separator = this.argv.indexOf('--');
    const command = separator >= 0 ? this.argv.slice(separator + 1) : [];
    const config = loadMirrorConfig(flags.config);
    const ports = new Map((flags.port ?? config.ports ?? []).map(parsePortMapping));
    const target = targetOf(flags) ?? targetOf(config);
    if (!target)
      this.error('no target: give --pid or --netns (or "pid"/"netns" in mirrord.json)', {
        exit: 2,
      });
    if (command.length === 0 && ports.size === 0) {
      this.error('nothing to mirror into: give a COMMAND after --, or --port REMOTE:LOCAL', {
        exit: 2,
      });
    }
    const interrupted = new Promise<void>((resolve) => {
      // `on`, not `once`: see the demo command.
      process.on('SIGINT', resolve);
      process.on('SIGTERM', resolve);
    });
    const status = new StatusLine();
    const onEvent = flags.json
      ? (event: MirrorEvent) => process.stdout.write(`${JSON.stringify(event)}\n`)
      : (event: MirrorEvent) => {
          if (event.event === 'counters') status.update(event);
        };
    process.exitCode = await runMirror({
      placeAgent: placeLocalAgent(target),
      command: command.length ? command : undefined,
      ports,
      ignorePorts: new Set(flags['ignore-port'] ?? config.ignorePorts ?? []),
      midStream: flags['mid-stream'] ?? config.midStream ?? false,
      log: (line) => {
        status.clear();
        this.logToStderr(line);
      },
      onEvent,
      interrupted,
    }).then((code) => {
      status.finish();
      return code;
    });
  }
}
