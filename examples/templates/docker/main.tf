# docker: a workspace is a container on the provisioner's Docker host. The
# home directory is a Docker volume that survives stop and start; the
# container runs (with the agent inside) only while the workspace is
# started.
#
#   devmesh templates init --starter docker ./docker
#   devmesh templates push docker -d ./docker
#   devmesh create dev --template docker
#
# Needs: Docker on the provisioner's machine (or DOCKER_HOST), and the
# kreuzwerker/docker provider from the Terraform registry (or a mirror).
# The container must reach the primary's access URL: with a primary on the
# Docker host, start it with an access URL such as
# http://host.docker.internal:3900 (mapped to the host below).

terraform {
  required_providers {
    devmesh = { source = "devmesh/devmesh" }
    docker  = { source = "kreuzwerker/docker", version = "~> 3.0" }
  }
}

provider "docker" {}

data "devmesh_workspace" "me" {}
data "devmesh_workspace_owner" "me" {}

data "devmesh_parameter" "image" {
  name        = "image"
  description = "The container image (it needs sh and curl or wget)."
  default     = "buildpack-deps:bookworm-curl"
  mutable     = true
}

locals {
  # Named after the workspace's id: owner and workspace names may contain
  # hyphens, so joining them could collide ("a-b" + "c" and "a" + "b-c")
  # and hand one user another's volume.
  name = "devmesh-${data.devmesh_workspace.me.id}"
}

resource "devmesh_agent" "main" {
  os   = "linux"
  arch = "amd64"
  dir  = "/home/dev"
}

# Persistent: the home directory.
resource "docker_volume" "home" {
  name = "${local.name}-home"
  labels {
    label = "devmesh.owner"
    value = data.devmesh_workspace_owner.me.name
  }
  lifecycle {
    ignore_changes = all
  }
}

# Ephemeral: the container running the agent.
resource "docker_container" "workspace" {
  count      = data.devmesh_workspace.me.start_count
  image      = data.devmesh_parameter.image.value
  name       = local.name
  hostname   = data.devmesh_workspace.me.name
  entrypoint = ["sh", "-c", devmesh_agent.main.init_script]
  env = [
    "DEVMESH_AGENT_TOKEN=${devmesh_agent.main.token}",
    "DEVMESH_AGENT_DIR=/home/dev/.devmesh",
  ]
  host {
    host = "host.docker.internal"
    ip   = "host-gateway"
  }
  volumes {
    container_path = "/home/dev"
    volume_name    = docker_volume.home.name
  }
}

resource "devmesh_metadata" "container" {
  count       = data.devmesh_workspace.me.start_count
  resource_id = docker_container.workspace[0].id
  items = {
    image = data.devmesh_parameter.image.value
  }
}

# Whatever listens on port 8000 in the container.
resource "devmesh_app" "web" {
  agent_id = devmesh_agent.main.id
  slug     = "web"
  port     = 8000
}
