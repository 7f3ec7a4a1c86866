import { join } from 'node:path';
import {
  API_PORT,
  BRIDGE,
  CLUSTER_DOMAIN,
  CNI_CONF,
  CNI_IPAM,
  CONTAINERD_ROOT,
  CONTAINERD_SOCKET,
  CONTAINERD_STATE,
  DNS_SERVICE_IP,
  ETCD_CLIENT_PORT,
  ETCD_DATA,
  ETCD_PEER_PORT,
  KUBELET_ROOT,
  LOGS,
  NODE_IP,
  NODE_NAME,
  POD_CIDR,
  POD_GATEWAY,
  RUN,
  SERVICE_CIDR,
  TEST_RANGE,
} from './layout.js';
import {
  API_SERVER_CERT,
  API_SERVER_KEY,
  CA_CERT,
  CA_KEY,
  IDENTITIES,
  SERVICE_ACCOUNT_KEY,
  SERVICE_ACCOUNT_PUBLIC_KEY,
  certPath,
  keyPath,
  kubeconfigPath,
} from './pki.js';

/**
 * What each of the cluster's processes is started with, and the config files they read. The
 * processes are the real ones, configured as kubeadm would for one node, with the differences
 * this machine needs said where they are made.
 */

export interface Component {
  name: string;
  command: string;
  args: string[];
  /** Config files to write before the start: path → content. */
  files?: Record<string, string>;
  /** Answers 200 once the component is ready. */
  health?: string;
}

export const ETCD_URL = `http://127.0.0.1:${ETCD_CLIENT_PORT}`;

export function etcd(bin: string): Component {
  const peer = `http://127.0.0.1:${ETCD_PEER_PORT}`;
  return {
    name: 'etcd',
    command: join(bin, 'etcd'),
    args: [
      '--name=mirrord-dev',
      `--data-dir=${ETCD_DATA}`,
      `--listen-client-urls=${ETCD_URL}`,
      `--advertise-client-urls=${ETCD_URL}`,
      `--listen-peer-urls=${peer}`,
      `--initial-advertise-peer-urls=${peer}`,
      `--initial-cluster=mirrord-dev=${peer}`,
      '--listen-metrics-urls=',
      // A test cluster's data is thrown away at every start: durability buys nothing here.
      '--unsafe-no-fsync',
      '--log-level=warn',
    ],
    health: `${ETCD_URL}/health`,
  };
}

/** The API server's audit log: what tests read to see which requests mirrord made. */
export const AUDIT_LOG = join(LOGS, 'audit.log');

export function apiServer(bin: string): Component {
  const kubeletClient = IDENTITIES.apiServerKubeletClient;
  const auditPolicy = join(RUN, 'audit-policy.yaml');
  return {
    name: 'kube-apiserver',
    command: join(bin, 'kube-apiserver'),
    args: [
      `--etcd-servers=${ETCD_URL}`,
      `--bind-address=${NODE_IP}`,
      `--advertise-address=${NODE_IP}`,
      `--secure-port=${API_PORT}`,
      `--tls-cert-file=${API_SERVER_CERT}`,
      `--tls-private-key-file=${API_SERVER_KEY}`,
      `--client-ca-file=${CA_CERT}`,
      '--authorization-mode=Node,RBAC',
      '--enable-admission-plugins=NodeRestriction',
      `--service-cluster-ip-range=${SERVICE_CIDR}`,
      `--service-account-issuer=https://kubernetes.default.svc.${CLUSTER_DOMAIN}`,
      `--service-account-key-file=${SERVICE_ACCOUNT_PUBLIC_KEY}`,
      `--service-account-signing-key-file=${SERVICE_ACCOUNT_KEY}`,
      `--kubelet-client-certificate=${certPath(kubeletClient)}`,
      `--kubelet-client-key=${keyPath(kubeletClient)}`,
      '--kubelet-preferred-address-types=InternalIP',
      '--allow-privileged=true',
      '--profiling=false',
      `--audit-policy-file=${auditPolicy}`,
      `--audit-log-path=${AUDIT_LOG}`,
      '--audit-log-format=json',
      '--v=1',
    ],
    files: {
      // Jobs' creates and deletes with their bodies; nothing else (the log stays small).
      [auditPolicy]: JSON.stringify({
        apiVersion: 'audit.k8s.io/v1',
        kind: 'Policy',
        omitStages: ['RequestReceived'],
        rules: [
          {
            level: 'Request',
            resources: [{ group: 'batch', resources: ['jobs'] }],
            verbs: ['create', 'delete'],
          },
          { level: 'None' },
        ],
      }),
    },
    // /readyz needs credentials (anonymous requests are allowed to it by the bootstrap policy).
    health: `https://${NODE_IP}:${API_PORT}/readyz`,
  };
}

/** Flags that make a control-plane component a client of the API server with `identity`. */
function clientOf(identity: { name: string; user: string }): string[] {
  const kubeconfig = kubeconfigPath(identity);
  return [
    `--kubeconfig=${kubeconfig}`,
    `--authentication-kubeconfig=${kubeconfig}`,
    `--authorization-kubeconfig=${kubeconfig}`,
    '--bind-address=127.0.0.1',
    // One instance: no leader to elect, and no lease to wait for after a restart.
    '--leader-elect=false',
  ];
}

export function controllerManager(bin: string): Component {
  return {
    name: 'kube-controller-manager',
    command: join(bin, 'kube-controller-manager'),
    args: [
      ...clientOf(IDENTITIES.controllerManager),
      '--use-service-account-credentials=true',
      `--service-account-private-key-file=${SERVICE_ACCOUNT_KEY}`,
      `--root-ca-file=${CA_CERT}`,
      `--cluster-signing-cert-file=${CA_CERT}`,
      `--cluster-signing-key-file=${CA_KEY}`,
      `--service-cluster-ip-range=${SERVICE_CIDR}`,
      '--v=1',
    ],
    health: 'https://127.0.0.1:10257/healthz',
  };
}

export function scheduler(bin: string): Component {
  return {
    name: 'kube-scheduler',
    command: join(bin, 'kube-scheduler'),
    args: [...clientOf(IDENTITIES.scheduler), '--v=1'],
    health: 'https://127.0.0.1:10259/healthz',
  };
}

export function containerd(): Component {
  const config = join(RUN, 'containerd.toml');
  const cri = 'plugins."io.containerd.grpc.v1.cri"';
  return {
    name: 'containerd',
    command: 'containerd',
    args: ['--config', config],
    files: {
      [config]: `version = 2
root = "${CONTAINERD_ROOT}"
state = "${CONTAINERD_STATE}"

[grpc]
  address = "${CONTAINERD_SOCKET}"

[${cri}]
  # Built here from pause.c by images.sh: no registry to pull registry.k8s.io/pause from.
  sandbox_image = "mirrord.test/pause:1"
  # This VM lacks CAP_SYS_RESOURCE: without it every sandbox fails on oom_score_adj.
  restrict_oom_score_adj = true
  # Pod network namespaces under containerd's own state, not /var/run/netns: all ours to remove.
  netns_mounts_under_state_dir = true
  [${cri}.containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [${cri}.containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [${cri}.containerd.runtimes.runc.options]
        # No systemd here (PID 1 is not systemd): cgroupfs, as the kubelet is told too.
        SystemdCgroup = false
  [${cri}.cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "${CNI_CONF}"
`,
      // Pods are routed only into the test range: a pod cannot send past this machine.
      [join(CNI_CONF, '10-mirrord-dev.conflist')]: JSON.stringify(
        {
          cniVersion: '0.4.0',
          name: 'mirrord-dev',
          plugins: [
            {
              type: 'bridge',
              bridge: BRIDGE,
              isGateway: true,
              ipMasq: false,
              hairpinMode: true,
              ipam: {
                type: 'host-local',
                ranges: [[{ subnet: POD_CIDR, gateway: POD_GATEWAY }]],
                routes: [{ dst: TEST_RANGE }],
                dataDir: CNI_IPAM,
              },
            },
          ],
        },
        null,
        2,
      ),
    },
  };
}

export function kubelet(bin: string): Component {
  const config = join(RUN, 'kubelet.yaml');
  return {
    name: 'kubelet',
    command: join(bin, 'kubelet'),
    args: [
      `--config=${config}`,
      `--kubeconfig=${kubeconfigPath(IDENTITIES.kubelet)}`,
      `--root-dir=${KUBELET_ROOT}`,
      `--hostname-override=${NODE_NAME}`,
      `--node-ip=${NODE_IP}`,
      '--v=1',
    ],
    files: {
      [config]: JSON.stringify(
        {
          apiVersion: 'kubelet.config.k8s.io/v1beta1',
          kind: 'KubeletConfiguration',
          address: NODE_IP,
          healthzBindAddress: '127.0.0.1',
          healthzPort: 10248,
          authentication: {
            anonymous: { enabled: false },
            webhook: { enabled: true },
            x509: { clientCAFile: CA_CERT },
          },
          authorization: { mode: 'Webhook' },
          containerRuntimeEndpoint: `unix://${CONTAINERD_SOCKET}`,
          // containerd 1.6 cannot report its cgroup driver, so the kubelet takes this one.
          cgroupDriver: 'cgroupfs',
          // This machine has cgroup v1 controllers (a hybrid hierarchy); 1.34 still allows them.
          failCgroupV1: false,
          failSwapOn: false,
          clusterDomain: CLUSTER_DOMAIN,
          clusterDNS: [DNS_SERVICE_IP],
          // Images come from archives, not a registry: garbage-collecting one would lose it.
          imageGCHighThresholdPercent: 100,
          imageGCLowThresholdPercent: 99,
          // A developer's disk may be fuller than a node's: evict only when nearly out.
          evictionHard: {
            'memory.available': '100Mi',
            'nodefs.available': '1%',
            'nodefs.inodesFree': '1%',
            'imagefs.available': '1%',
          },
          serializeImagePulls: false,
        },
        null,
        2,
      ),
    },
    health: 'http://127.0.0.1:10248/healthz',
  };
}

export function kubeProxy(bin: string): Component {
  const config = join(RUN, 'kube-proxy.yaml');
  return {
    name: 'kube-proxy',
    command: join(bin, 'kube-proxy'),
    args: [`--config=${config}`, '--v=1'],
    files: {
      [config]: JSON.stringify(
        {
          apiVersion: 'kubeproxy.config.k8s.io/v1alpha1',
          kind: 'KubeProxyConfiguration',
          clientConnection: { kubeconfig: kubeconfigPath(IDENTITIES.kubeProxy) },
          mode: 'iptables',
          clusterCIDR: POD_CIDR,
          hostnameOverride: NODE_NAME,
          healthzBindAddress: '127.0.0.1:10256',
          metricsBindAddress: '127.0.0.1:10249',
          // NodePorts only on the node's test address, never on the machine's real interfaces.
          nodePortAddresses: [`${NODE_IP}/32`],
          // Leave the host's conntrack table size alone.
          conntrack: { maxPerCore: 0 },
        },
        null,
        2,
      ),
    },
    health: 'http://127.0.0.1:10256/healthz',
  };
}
