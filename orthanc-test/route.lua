-- Auto-routing as a radiology department would set it up: once a study has been
-- quiet for StableAge seconds, send its radiograph series (CR, DX, and RF/XA/OT/RG
-- single images) to a fracture-node.  The node's own results (Manufacturer
-- "fracture-node", or SR/DOC series) are never routed back: no loop.  The node
-- refuses its own objects on its side too.
--
-- The nodes are the DicomModalities whose name starts with "fracture-node", in name
-- order: one ("fracture-node") for a single node, or a group sharing one job database
-- ("fracture-node-1", "fracture-node-2", ...; docs/deploy.md).  Each study goes to ONE
-- of them, chosen by a hash of its Study Instance UID (the same study always goes to
-- the same node while it is up); if that C-STORE fails (node down, or 0xA700 because
-- its job database is down), the next node in the list is tried, and so on.  Any node
-- may be chosen for any part of a study: a group keeps one job per Study Instance
-- UID, so the fall-over never splits a study into two reports.

local PREFIX = 'fracture-node'
local ROUTED_MODALITIES = { CR = true, DX = true, RF = true, XA = true, OT = true, RG = true }

local function nodeNames()
  local names = {}
  local config = GetOrthancConfiguration()
  for name, _ in pairs(config['DicomModalities'] or {}) do
    if string.sub(name, 1, string.len(PREFIX)) == PREFIX then
      table.insert(names, name)
    end
  end
  table.sort(names)
  return names
end

-- A stable string hash (31 * h + byte, modulo 2^31 - 1), the same on every Orthanc.
local function hash(s)
  local h = 0
  for i = 1, string.len(s) do
    h = (h * 31 + string.byte(s, i)) % 2147483647
  end
  return h
end

-- The instances of the study's radiograph series that are not the node's own results.
local function radiographInstances(studyId)
  local series = ParseJson(RestApiGet('/studies/' .. studyId .. '/series'))
  local instances = {}
  for _, s in ipairs(series) do
    local modality = s['MainDicomTags']['Modality'] or ''
    local first = s['Instances'][1]
    local manufacturer = ''
    if first ~= nil then
      local t = ParseJson(RestApiGet('/instances/' .. first .. '/simplified-tags'))
      manufacturer = t['Manufacturer'] or ''
    end
    if ROUTED_MODALITIES[modality] and manufacturer ~= 'fracture-node' then
      for _, i in ipairs(s['Instances']) do
        table.insert(instances, i)
      end
    end
  end
  return instances
end

function OnStableStudy(studyId, tags, metadata)
  local instances = radiographInstances(studyId)
  local nodes = nodeNames()
  if #instances == 0 or #nodes == 0 then
    return
  end
  local uid = tags['StudyInstanceUID'] or studyId
  local first = hash(uid) % #nodes
  -- Synchronous: the answer says whether the node stored it, so a failure can fall over
  local body = DumpJson({ Resources = instances, Synchronous = true }, true)
  for k = 0, #nodes - 1 do
    local node = nodes[((first + k) % #nodes) + 1]
    local ok, answer = pcall(RestApiPost, '/modalities/' .. node .. '/store', body)
    if ok and answer ~= nil and answer ~= '' then
      print('fracture-node routing: study ' .. uid .. ', ' .. #instances ..
            ' instance(s) to ' .. node)
      return
    end
    print('fracture-node routing: study ' .. uid .. ': ' .. node ..
          ' failed, trying the next node')
  end
  print('fracture-node routing: study ' .. uid .. ': every node failed')
end
