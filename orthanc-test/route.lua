-- Auto-routing as a radiology department would set it up: once a study has been
-- quiet for StableAge seconds, send its radiograph series (CR, DX, and RF/XA/OT
-- single images) to the fracture-node modality.  The node's own results
-- (Manufacturer "fracture-node", or SR/DOC series) are never routed back: no loop.
-- The node refuses its own objects on its side too.

local NODE = 'fracture-node'
local ROUTED_MODALITIES = { CR = true, DX = true, RF = true, XA = true, OT = true, RG = true }

function OnStableStudy(studyId, tags, metadata)
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
  if #instances > 0 then
    print('fracture-node routing: study ' .. studyId .. ', ' .. #instances .. ' instance(s)')
    RestApiPost('/modalities/' .. NODE .. '/store',
                DumpJson({ Resources = instances, Synchronous = false }, true))
  end
end
