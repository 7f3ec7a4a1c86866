import { Flags } from '@oclif/core';
import { MirrordCommand, UsageError } from '../cli/base-command.js';
import { runChecks, type CheckStatus, type DoctorReport } from '../doctor/checks.js';

const MARKS: Record<CheckStatus, string> = { ok: 'ok', warn: 'warn', fail: 'FAIL' };

export default class DoctorCommand extends MirrordCommand {
  static override summary = 'Check what mirroring needs on this machine and say what is missing.';
  static override description =
    'Checks the kernel, BPF, privileges, the tap addon, the layer and the kubeconfig, each by trying it (nothing is attached anywhere); with -- COMMAND, also whether mirror can run COMMAND and the layer can hook it (not a Go program, not statically linked). Exits with 1 when a check fails; warnings alone exit with 0.';
  static override usage = ['<%= command.id %> [FLAGS] [-- COMMAND [ARGS…]]'];
  static override examples = [
    '<%= config.bin %> doctor',
    'sudo <%= config.bin %> doctor --context staging',
    '<%= config.bin %> doctor -- ./server --port 8080',
  ];
  // --json: the report as one JSON object, { checks: [...], ok }.
  static override enableJsonFlag = true;
  // COMMAND, as `mirror` takes it after `--`, with arguments that are not doctor's flags.
  static override strict = false;

  static override flags = {
    kubeconfig: Flags.string({
      summary: 'Kubeconfig file to check (default: KUBECONFIG, else ~/.kube/config).',
      helpValue: 'FILE',
    }),
    context: Flags.string({
      summary: 'Kubeconfig context to check (default: the current one).',
      helpValue: 'NAME',
    }),
  };

  async run(): Promise<DoctorReport> {
    const { flags, argv } = await this.parse(DoctorCommand);
    const separator = this.argv.indexOf('--');
    const command = separator >= 0 ? this.argv.slice(separator + 1) : [];
    // oclif's argv holds what is neither a flag nor after `--` first, then COMMAND.
    if (argv.length > command.length) {
      throw new UsageError(
        `unexpected argument "${String(argv[0])}": a COMMAND to check goes after --, as in ${this.config.bin} doctor -- ./server`,
      );
    }
    const report = await runChecks({
      kubeconfig: flags.kubeconfig,
      context: flags.context,
      command: command[0],
    });
    const width = Math.max(...report.checks.map((check) => check.title.length));
    for (const check of report.checks) {
      this.log(`${MARKS[check.status].padEnd(4)}  ${check.title.padEnd(width)}  ${check.detail}`);
      if (check.fix) this.log(`${' '.repeat(8 + width)}fix: ${check.fix}`);
    }
    process.exitCode = report.ok ? 0 : 1;
    return report;
  }
}
