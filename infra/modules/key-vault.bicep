// Key Vault for the Direct Line secret and the providers' keys. RBAC only (no access policies):
// the app's identity reads secrets as Key Vault Secrets User (role-assignments.bicep). Every secret
// read is audited to the Log Analytics workspace.
param name string
param location string
param tags object

@description('Purge protection: a deleted vault (and its name) is kept for 7 days and nobody can purge it; it cannot be switched off again.')
param purgeProtection bool

@description('Resource id of the Log Analytics workspace that receives the vault\'s AuditEvent log.')
param workspaceId string

@secure()
@description('Secret name -> value; an empty value stores nothing (that channel stays off).')
param secrets object

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109: Key Vault references from an app without VNet integration need the public endpoint; RBAC (no access policies) guards it
  // checkov:skip=CKV_AZURE_189: same reason as CKV_AZURE_109
  // checkov:skip=CKV_AZURE_110: purge protection is the purgeProtection parameter: on for production, off for environments that `azd down --purge` must be able to remove and recreate
  // checkov:skip=CKV_AZURE_42: soft delete is always on; purge protection is the purgeProtection parameter (CKV_AZURE_110)
  name: name
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: 7
    // The service refuses `false` here once a vault exists ("cannot be disabled"): omit it instead.
    enablePurgeProtection: purgeProtection ? true : null
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      bypass: 'AzureServices'
      defaultAction: 'Allow'
    }
  }
}

resource secret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = [for item in items(secrets): if (!empty(item.value)) {
  // checkov:skip=CKV_AZURE_41: the providers decide when their keys expire; an expiry date here would switch a channel off silently
  parent: vault
  name: item.key
  properties: {
    value: item.value
    contentType: 'text/plain'
  }
}]

// Who read or changed which secret, and when (Learn: "Diagnostic setting for Azure Key Vault").
resource audit 'Microsoft.Insights/diagnosticSettings@2021-05-01-preview' = {
  name: 'audit-to-log-analytics'
  scope: vault
  properties: {
    workspaceId: workspaceId
    logs: [
      {
        category: 'AuditEvent'
        enabled: true
      }
    ]
  }
}

output name string = vault.name
output uri string = vault.properties.vaultUri
