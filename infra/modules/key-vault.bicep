// Key Vault for the Direct Line secret and the providers' keys. RBAC only (no access policies):
// the app's identity reads secrets as Key Vault Secrets User (role-assignments.bicep).
param name string
param location string
param tags object

@secure()
@description('Secret name -> value; an empty value stores nothing (that channel stays off).')
param secrets object

resource vault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  // checkov:skip=CKV_AZURE_109: Key Vault references from an app without VNet integration need the public endpoint; RBAC (no access policies) guards it
  // checkov:skip=CKV_AZURE_189: same reason as CKV_AZURE_109
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
    enablePurgeProtection: true
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

output name string = vault.name
output uri string = vault.properties.vaultUri
