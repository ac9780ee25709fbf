# kubernetes: a workspace is a pod. The home directory is a persistent
# volume claim that survives stop and start; the pod runs (with the agent
# inside) only while the workspace is started.
#
#   devmesh templates init --starter kubernetes ./kubernetes
#   devmesh templates push kubernetes -d ./kubernetes
#   devmesh create dev --template kubernetes
#
# Needs: a cluster the provisioner reaches (KUBE_CONFIG_PATH, or in-cluster
# credentials when the provisioner daemon runs as a pod with a service
# account allowed to manage pods, secrets and claims in the namespace set
# below), and
# the hashicorp/kubernetes provider from the Terraform registry (or a
# mirror). Pods must reach the primary's access URL.

terraform {
  required_providers {
    devmesh    = { source = "devmesh/devmesh" }
    kubernetes = { source = "hashicorp/kubernetes", version = "~> 2.23" }
  }
}

provider "kubernetes" {}

data "devmesh_workspace" "me" {}
data "devmesh_workspace_owner" "me" {}

data "devmesh_parameter" "image" {
  name        = "image"
  description = "The container image (it needs sh and curl or wget)."
  default     = "buildpack-deps:bookworm-curl"
  mutable     = true
}

data "devmesh_parameter" "home_size" {
  name           = "home_size"
  type           = "number"
  description    = "The home volume's size in GiB."
  default        = "10"
  validation_min = 1
  validation_max = 500
}

data "devmesh_parameter" "cpu" {
  name           = "cpu"
  type           = "number"
  description    = "CPU cores."
  default        = "2"
  validation_min = 1
  validation_max = 16
  mutable        = true
}

locals {
  # Named after the workspace's id: owner and workspace names may contain
  # hyphens, so joining them could collide and hand one user another's
  # volume.
  name = "devmesh-${data.devmesh_workspace.me.id}"
  # Fixed by the template's author, not chosen by whoever creates a
  # workspace: the daemon's service account needs rights here only.
  namespace = "devmesh-workspaces"
  labels = {
    "app.kubernetes.io/name"       = "devmesh-workspace"
    "app.kubernetes.io/instance"   = local.name
    "devmesh.dev/workspace-id"     = data.devmesh_workspace.me.id
    "devmesh.dev/owner"            = data.devmesh_workspace_owner.me.name
    "app.kubernetes.io/managed-by" = "devmesh"
  }
}

resource "devmesh_agent" "main" {
  os   = "linux"
  arch = "amd64"
  dir  = "/home/dev"
}

# Persistent: the home directory.
resource "kubernetes_persistent_volume_claim" "home" {
  metadata {
    name      = "${local.name}-home"
    namespace = local.namespace
    labels    = local.labels
  }
  wait_until_bound = false
  spec {
    access_modes = ["ReadWriteOnce"]
    resources {
      requests = {
        storage = "${data.devmesh_parameter.home_size.value}Gi"
      }
    }
  }
  lifecycle {
    ignore_changes = all
  }
}

# Ephemeral: the agent's token, kept out of the pod spec.
resource "kubernetes_secret" "agent" {
  count = data.devmesh_workspace.me.start_count
  metadata {
    name      = "${local.name}-agent"
    namespace = local.namespace
    labels    = local.labels
  }
  data = {
    token = devmesh_agent.main.token
  }
}

# Ephemeral: the pod running the agent.
resource "kubernetes_pod" "workspace" {
  count = data.devmesh_workspace.me.start_count
  metadata {
    name      = local.name
    namespace = local.namespace
    labels    = local.labels
  }
  spec {
    hostname = data.devmesh_workspace.me.name
    security_context {
      run_as_user  = 1000
      fs_group     = 1000
      run_as_group = 1000
    }
    container {
      name    = "dev"
      image   = data.devmesh_parameter.image.value
      command = ["sh", "-c", devmesh_agent.main.init_script]
      env {
        name = "DEVMESH_AGENT_TOKEN"
        value_from {
          secret_key_ref {
            name = kubernetes_secret.agent[0].metadata[0].name
            key  = "token"
          }
        }
      }
      env {
        name  = "DEVMESH_AGENT_DIR"
        value = "/home/dev/.devmesh"
      }
      resources {
        requests = {
          cpu    = "${data.devmesh_parameter.cpu.value}"
          memory = "2Gi"
        }
        limits = {
          cpu = "${data.devmesh_parameter.cpu.value}"
        }
      }
      volume_mount {
        name       = "home"
        mount_path = "/home/dev"
      }
    }
    volume {
      name = "home"
      persistent_volume_claim {
        claim_name = kubernetes_persistent_volume_claim.home.metadata[0].name
      }
    }
  }
}

resource "devmesh_metadata" "home" {
  resource_id = kubernetes_persistent_volume_claim.home.id
  items = {
    size = "${data.devmesh_parameter.home_size.value} GiB"
  }
}

resource "devmesh_metadata" "pod" {
  count       = data.devmesh_workspace.me.start_count
  resource_id = kubernetes_pod.workspace[0].id
  items = {
    image = data.devmesh_parameter.image.value
    cpu   = data.devmesh_parameter.cpu.value
  }
}

# Whatever listens on port 8000 in the pod.
resource "devmesh_app" "web" {
  agent_id = devmesh_agent.main.id
  slug     = "web"
  port     = 8000
}
