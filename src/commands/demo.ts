import { Flags } from '@oclif/core';
import { EXIT, MirrordCommand } from '../cli/base-command.js';
import { localPrivilegesProblem } from '../cli/mirror-settings.js';
import { runDemo } from '../demo/run-demo.js';

export default class DemoCommand extends MirrordCommand {
  static override summary =
    'Mirror a sandbox "staging" service on this machine: no cluster needed.';
  static override description =
    'Creates a network namespace with a small HTTP service and a traffic generator, and mirrors it into the example app examples/orders-app/server.js, which prints each request it gets next to the ones staging answered. Removes everything when it ends or on Ctrl-C. Needs root.';

  static override flags = {
    duration: Flags.integer({
      summary: 'Seconds of traffic to mirror (0: until Ctrl-C).',
      default: 20,
      min: 0,
    }),
  };

  async run(): Promise<void> {
    const { flags } = await this.parse(DemoCommand);
    // The demo's sandbox and agent need what a local target of `mirror` needs: the same line.
    const privilegesIssue = localPrivilegesProblem();
    if (privilegesIssue) this.error(privilegesIssue, { exit: EXIT.failure });
    let wasInterrupted = false;
    // `on`, not `once`: execa's exit handler re-raises a signal that no other listener is left
    // to handle, which would kill the demo before it removes its sandbox.
    const interrupted = new Promise<void>((resolve) => {
      const interrupt = (): void => {
        wasInterrupted = true;
        resolve();
      };
      process.on('SIGINT', interrupt);
      process.on('SIGTERM', interrupt);
    });
    try {
      await runDemo({
        durationSeconds: flags.duration,
        log: (line) => this.log(line),
        interrupted,
      });
    } catch (error) {
      this.error((error as Error).message, { exit: EXIT.failure });
    }
    // Cleaned up and summed up, but stopped before its time: a script must be able to tell.
    if (wasInterrupted) process.exitCode = EXIT.interrupted;
  }
}
