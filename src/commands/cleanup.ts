import { Flags } from '@oclif/core';
import { MirrordCommand } from '../cli/base-command.js';
import { clusterFlags, kubeAccessOptions, namespaceFlags } from '../cli/cluster-flags.js';
import { loadKubeAccess } from '../platform/kube/kubeconfig.js';
import { cleanupLeftovers, formatCleanup, type CleanupResult } from '../platform/kube/cleanup.js';

export default class CleanupCommand extends MirrordCommand {
  static override summary =
    'Remove the agent Jobs that crashed mirrord sessions left in the cluster.';
  static override description =
    'Deletes the mirrord Jobs (and their pods) whose session is over: the agent finished, the CLI that made the Job is no longer running on this machine, or the agent never started. Jobs whose session may still be running elsewhere are kept unless --all is given.';
  static override examples = [
    '<%= config.bin %> cleanup',
    '<%= config.bin %> cleanup -n staging --json',
    '<%= config.bin %> cleanup --all --all-namespaces',
  ];
  static override enableJsonFlag = true;

  static override flags = {
    ...namespaceFlags('clean'),
    all: Flags.boolean({
      summary: 'Remove every mirrord Job, also those of sessions that may still be running.',
    }),
    ...clusterFlags(),
  };

  async run(): Promise<CleanupResult> {
    const { flags } = await this.parse(CleanupCommand);
    const access = loadKubeAccess(kubeAccessOptions(flags));
    const allNamespaces = flags['all-namespaces'];
    const result = await cleanupLeftovers(access, { allNamespaces, all: flags.all });
    if (!this.jsonEnabled()) {
      const scope = allNamespaces ? 'in any namespace' : `in namespace ${access.namespace}`;
      this.log(formatCleanup(result, scope));
    }
    return result;
  }
}
