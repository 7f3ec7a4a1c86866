import { Flags } from '@oclif/core';
import { MirrordCommand } from '../cli/base-command.js';
import { startAgent } from '../agent/server.js';
import { AGENT_DEFAULTS } from '../platform/kube/agent-job.js';
import { readFileSync } from 'node:fs';
import { SECRET_ENV, type NodeTarget } from '../protocol/agent-launch.js';

export default class AgentCommand extends MirrordCommand {
  static override hidden = true;
  static override summary =
    "Tap a network namespace's incoming TCP and serve it, reassembled, to one mirrord session.";
  static override description =
    'Runs next to the target (as a Kubernetes Job, or as a local child process of `mirrord mirror`). Prints one JSON readiness line, serves one session, and exits when the session ends or none arrives within --idle-timeout.';
  static override examples = [
    '<%= config.bin %> agent --netns staging',
    '<%= config.bin %> agent --container-id containerd://4f1c…',
  ];

  static override flags = {
    pid: Flags.integer({
      summary: 'Tap the network namespace of this process.',
      min: 1,
      exactlyOne: ['pid', 'netns', 'container-id'],
    }),
    netns: Flags.string({ summary: 'Tap this named network namespace (ip netns).' }),
    'container-id': Flags.string({
      summary: 'Tap the network namespace of this container (found in /proc/*/cgroup).',
    }),
    listen: Flags.string({
      summary: 'Address and port to serve the session on (port 0: any free port).',
      default: '127.0.0.1:0',
    }),
    'idle-timeout': Flags.integer({
      summary: 'Seconds to wait for a session before exiting.',
      default: AGENT_DEFAULTS.idleTimeoutSeconds,
      min: 1,
    }),
    'ring-buffer-mib': Flags.integer({
      summary: 'Size of the kernel ring buffer in MiB (a power of two).',
      default: 8,
      min: 1,
    }),
    'secret-file': Flags.string({
      summary: `A file holding the session secret, when ${SECRET_ENV} does not (a mounted Secret).`,
      helpValue: 'PATH',
    }),
    'attach-mode': Flags.option({
      summary: 'How to attach: TCX links (kernel 6.6+), legacy tc filters, or whichever works.',
      options: ['auto', 'tcx', 'tc'] as const,
      default: 'auto' as const,
    })(),
  };

  async run(): Promise<void> {
    const { flags } = await this.parse(AgentCommand);
    const target: NodeTarget =
      flags.pid !== undefined
        ? { pid: flags.pid }
        : flags.netns !== undefined
          ? { netns: flags.netns }
          : { containerId: flags['container-id'] ?? '' };
    const secret = this.sessionSecret(flags['secret-file']);
    const listen = /^(.*):(\d+)$/.exec(flags.listen);
    if (!listen) this.error(`--listen "${flags.listen}" is not HOST:PORT, e.g. 127.0.0.1:0`);
    let agent;
    try {
      agent = await startAgent({
        target,
        host: listen[1] ?? '127.0.0.1',
        port: Number(listen[2]),
        idleTimeoutMs: flags['idle-timeout'] * 1000,
        secret,
        tap: {
          ringBufferBytes: flags['ring-buffer-mib'] * 1024 * 1024,
          attachMode: flags['attach-mode'],
        },
      });
    } catch (error) {
      this.error((error as Error).message, { exit: 2 });
    }
    for (const signal of ['SIGTERM', 'SIGINT'] as const) process.on(signal, () => agent.stop());
    this.log(JSON.stringify(agent.readiness));
    const exit = await agent.done;
    if (exit.error) this.error(exit.error, { exit: 1 });
  }

  /** The secret a client must present: from the environment, else the file; never from argv. */
  private sessionSecret(file: string | undefined): string {
    let secret = process.env[SECRET_ENV];
    // Nothing the agent starts needs it.
    delete process.env[SECRET_ENV];
    if (!secret && file !== undefined) {
      try {
        secret = readFileSync(file, 'utf8').trim();
      } catch (error) {
        this.error(`cannot read the session secret from ${file}: ${(error as Error).message}`, {
          exit: 2,
        });
      }
    }
    if (!secret) {
      this.error(`no session secret: set ${SECRET_ENV}, or give --secret-file PATH`, { exit: 2 });
    }
    return secret;
  }
}
