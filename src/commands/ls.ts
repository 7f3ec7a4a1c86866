import { MirrordCommand } from '../cli/base-command.js';
import { clusterFlags, kubeAccessOptions, namespaceFlags } from '../cli/cluster-flags.js';
import { loadKubeAccess } from '../platform/kube/kubeconfig.js';
import { formatTargets, listTargets, type ListedTarget } from '../platform/kube/list-targets.js';

export default class LsCommand extends MirrordCommand {
  static override summary =
    'List the Kubernetes targets you can mirror, with containers and ports.';
  static override description =
    'Deployments, statefulsets and running pods of the namespace (the context’s by default). The container marked by default is the one mirrored without --container; mesh sidecars are never the default.';
  static override examples = [
    '<%= config.bin %> ls',
    '<%= config.bin %> ls -n staging --json',
    '<%= config.bin %> ls --all-namespaces',
  ];
  static override enableJsonFlag = true;

  static override flags = {
    ...namespaceFlags('list'),
    ...clusterFlags(),
  };

  async run(): Promise<{ targets: ListedTarget[] }> {
    const { flags } = await this.parse(LsCommand);
    const access = loadKubeAccess(kubeAccessOptions(flags));
    const allNamespaces = flags['all-namespaces'];
    const { targets, notes } = await listTargets(access, { allNamespaces });
    for (const note of notes) this.logToStderr(`mirrord: ${note}`);
    if (!this.jsonEnabled()) {
      const scope = allNamespaces ? 'any namespace' : `namespace ${access.namespace}`;
      this.log(targets.length > 0 ? formatTargets(targets) : `no targets in ${scope}`);
      const example = targets.find((target) => target.mirrorable);
      if (example) {
        const ns = allNamespaces || flags.namespace ? ` -n ${example.namespace}` : '';
        this.log(`\nmirror one: mirrord mirror --${example.kind} ${example.name}${ns} -- COMMAND`);
      }
    }
    return { targets };
  }
}
