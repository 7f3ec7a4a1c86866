import { Flags } from '@oclif/core';
import { MirrordCommand } from '../cli/base-command.js';
import { runChecks, type CheckStatus, type DoctorReport } from '../doctor/checks.js';

const MARKS: Record<CheckStatus, string> = { ok: 'ok', warn: 'warn', fail: 'FAIL' };

export default class DoctorCommand extends MirrordCommand {
  static override summary = 'Check what mirroring needs on this machine and say what is missing.';
  static override description =
    'Checks the kernel, BPF, privileges, the tap addon, the layer and the kubeconfig, each by trying it (nothing is attached anywhere). Exits with 1 when a check fails; warnings alone exit with 0.';
  static override examples = [
    '<%= config.bin %> doctor',
    'sudo <%= config.bin %> doctor --context staging',
  ];
  // --json: the report as one JSON object, { checks: [...], ok }.
  static override enableJsonFlag = true;

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
    const { flags } = await this.parse(DoctorCommand);
    const report = await runChecks({ kubeconfig: flags.kubeconfig, context: flags.context });
    const width = Math.max(...report.checks.map((check) => check.title.length));
    for (const check of report.checks) {
      this.log(`${MARKS[check.status].padEnd(4)}  ${check.title.padEnd(width)}  ${check.detail}`);
      if (check.fix) this.log(`${' '.repeat(8 + width)}fix: ${check.fix}`);
    }
    process.exitCode = report.ok ? 0 : 1;
    return report;
  }
}
