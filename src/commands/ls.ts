import { Flags } from '@oclif/core';
import { MirrordCommand } from '../cli/base-command.js';
import { clusterFlags, kubeAccessOptions, namespaceFlags } from '../cli/cluster-flags.js';
import { loadKubeAccess } from '../platform/kube/kubeconfig.js';
import { formatTargets, listTargets, type ListedTarget } from '../platform/kube/list-targets.js';
import { listNetns } from '../platform/local/netns.js';

/** A target on this machine: a named network namespace (mirror --netns NAME). */
interface LocalTarget {
  target: string;
  kind: 'netns';
  name: string;
}

export default class LsCommand extends MirrordCommand {
  static override summary =
    'List the Kubernetes targets you can mirror, with containers and ports (--local: this machine’s network namespaces).';
  static override description =
    'Deployments, statefulsets and running pods of the namespace (the context’s by default). The container marked by default is the one mirrored without --container; mesh sidecars are never the default.';
  static override examples = [
    '<%= config.bin %> ls',
    '<%= config.bin %> ls -n staging --json',
    '<%= config.bin %> ls --all-namespaces',
    '<%= config.bin %> ls --local --json',
  ];
  static override enableJsonFlag = true;

  static override flags = {
    ...namespaceFlags('list'),
    ...clusterFlags(),
    local: Flags.boolean({
      summary: "List this machine's network namespaces (ip netns) instead: targets of --netns.",
      exclusive: ['namespace', 'all-namespaces', 'context', 'kubeconfig'],
    }),
  };

  async run(): Promise<{ targets: ListedTarget[] | LocalTarget[] }> {
    const { flags } = await this.parse(LsCommand);
    if (flags.local) {
      const names = listNetns('');
      if (!this.jsonEnabled()) {
        this.log(names.length > 0 ? names.join('\n') : 'no network namespaces on this machine');
      }
      return { targets: names.map((name) => ({ target: `netns/${name}`, kind: 'netns', name })) };
    }
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
