import { Flags } from '@oclif/core';
import { MirrordCommand } from '../cli/base-command.js';
import { runMirror } from '../session/mirror.js';
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
    const target =
      flags.pid !== undefined
        ? { pid: flags.pid }
        : flags.netns !== undefined
          ? { netns: flags.netns }
          : config.pid !== undefined
            ? { pid: config.pid }
            : config.netns !== undefined
              ? { netns: config.netns }
              : undefined;
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
    process.exitCode = await runMirror({
      target,
      command: command.length ? command : undefined,
      ports,
      ignorePorts: new Set(flags['ignore-port'] ?? config.ignorePorts ?? []),
      midStream: flags['mid-stream'] ?? config.midStream ?? false,
      log: (line) => this.logToStderr(line),
      interrupted,
    });
  }
}
