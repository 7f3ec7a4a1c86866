import { AppsV1Api, CoreV1Api, KubeConfig, RbacAuthorizationV1Api } from '@kubernetes/client-node';
import { CLUSTER_DOMAIN, DNS_SERVICE_IP, NODE_NAME } from './layout.js';
import { waitFor } from '../support/wait.js';

/**
 * The cluster's DNS, deployed as kubeadm deploys it (ServiceAccount, ClusterRole, ConfigMap with
 * the Corefile, Deployment, the `kube-dns` Service at the address the kubelet hands to pods),
 * from the image images.sh builds out of CoreDNS's own Go module.
 */

export const COREDNS_IMAGE = 'mirrord.test/coredns:v1.12.1';
const NAMESPACE = 'kube-system';
const LABELS = { 'k8s-app': 'kube-dns' };

/**
 * kubeadm's Corefile, less `forward . /etc/resolv.conf`: names outside the cluster get no
 * answer instead of a query to the developer's resolvers, so nothing in the cluster reaches
 * past this machine.
 */
const COREFILE = `.:53 {
    errors
    health {
       lameduck 5s
    }
    ready
    kubernetes ${CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {
       pods insecure
       fallthrough in-addr.arpa ip6.arpa
       ttl 30
    }
    cache 30
    loop
    reload
    loadbalance
}
`;

function clients(kubeconfig: string) {
  const config = new KubeConfig();
  config.loadFromFile(kubeconfig);
  return {
    core: config.makeApiClient(CoreV1Api),
    apps: config.makeApiClient(AppsV1Api),
    rbac: config.makeApiClient(RbacAuthorizationV1Api),
  };
}

export async function installAddons(kubeconfig: string): Promise<void> {
  const { core, apps, rbac } = clients(kubeconfig);
  const metadata = { name: 'coredns', namespace: NAMESPACE };
  await core.createNamespacedServiceAccount({ namespace: NAMESPACE, body: { metadata } });
  await rbac.createClusterRole({
    body: {
      metadata: { name: 'system:coredns' },
      rules: [
        {
          apiGroups: [''],
          resources: ['endpoints', 'services', 'pods', 'namespaces'],
          verbs: ['list', 'watch'],
        },
        {
          apiGroups: ['discovery.k8s.io'],
          resources: ['endpointslices'],
          verbs: ['list', 'watch'],
        },
      ],
    },
  });
  await rbac.createClusterRoleBinding({
    body: {
      metadata: { name: 'system:coredns' },
      roleRef: {
        apiGroup: 'rbac.authorization.k8s.io',
        kind: 'ClusterRole',
        name: 'system:coredns',
      },
      subjects: [{ kind: 'ServiceAccount', name: 'coredns', namespace: NAMESPACE }],
    },
  });
  await core.createNamespacedConfigMap({
    namespace: NAMESPACE,
    body: { metadata, data: { Corefile: COREFILE } },
  });
  await apps.createNamespacedDeployment({
    namespace: NAMESPACE,
    body: {
      metadata: { ...metadata, labels: LABELS },
      spec: {
        replicas: 1,
        selector: { matchLabels: LABELS },
        template: {
          metadata: { labels: LABELS },
          spec: {
            serviceAccountName: 'coredns',
            priorityClassName: 'system-cluster-critical',
            dnsPolicy: 'Default',
            containers: [
              {
                name: 'coredns',
                image: COREDNS_IMAGE,
                imagePullPolicy: 'Never',
                args: ['-conf', '/etc/coredns/Corefile'],
                ports: [
                  { name: 'dns', containerPort: 53, protocol: 'UDP' },
                  { name: 'dns-tcp', containerPort: 53, protocol: 'TCP' },
                  { name: 'metrics', containerPort: 9153, protocol: 'TCP' },
                ],
                readinessProbe: { httpGet: { path: '/ready', port: 8181 }, periodSeconds: 1 },
                volumeMounts: [{ name: 'config', mountPath: '/etc/coredns', readOnly: true }],
              },
            ],
            volumes: [{ name: 'config', configMap: { name: 'coredns' } }],
          },
        },
      },
    },
  });
  await core.createNamespacedService({
    namespace: NAMESPACE,
    body: {
      metadata: { name: 'kube-dns', namespace: NAMESPACE, labels: LABELS },
      spec: {
        clusterIP: DNS_SERVICE_IP,
        selector: LABELS,
        ports: [
          { name: 'dns', port: 53, protocol: 'UDP', targetPort: 53 },
          { name: 'dns-tcp', port: 53, protocol: 'TCP', targetPort: 53 },
          { name: 'metrics', port: 9153, protocol: 'TCP', targetPort: 9153 },
        ],
      },
    },
  });
}

/**
 * Resolves once the node is Ready, CoreDNS is available and the `default` ServiceAccount that
 * pods in `default` need exists; `check` throws when a cluster process died meanwhile.
 */
export async function waitUntilReady(
  kubeconfig: string,
  check: () => void,
  timeoutMs = 180_000,
): Promise<void> {
  const { core, apps } = clients(kubeconfig);
  const deadline = Date.now() + timeoutMs;
  const conditions: [string, () => Promise<boolean>][] = [
    [
      `node ${NODE_NAME} Ready`,
      async () => {
        const node = await core.readNode({ name: NODE_NAME });
        return (
          node.status?.conditions?.some((c) => c.type === 'Ready' && c.status === 'True') ?? false
        );
      },
    ],
    [
      'CoreDNS available',
      async () => {
        const deployment = await apps.readNamespacedDeployment({
          name: 'coredns',
          namespace: NAMESPACE,
        });
        return (deployment.status?.availableReplicas ?? 0) >= 1;
      },
    ],
    [
      'ServiceAccount default/default',
      async () =>
        Boolean(await core.readNamespacedServiceAccount({ name: 'default', namespace: 'default' })),
    ],
  ];
  // One deadline for all of them.
  for (const [what, ready] of conditions) {
    await waitFor(
      what,
      async () => {
        check();
        return ready().catch(() => false);
      },
      { ms: Math.max(0, deadline - Date.now()), everyMs: 250 },
    );
  }
}
